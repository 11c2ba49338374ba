"""What a scoring run was computed from (fingerprints), and the manifest that records it.

A scoring output directory holds the scores of ONE model on ONE dataset under ONE set of
choices. Its :class:`ScoringIdentity` lists everything that decides the numbers:

- ``model_fingerprint``: sha256 of the model directory's ``config.json`` and weight index files
  (content), the relative name and size of every other file except tokenizer files, and the
  header of every safetensors file (tensor names, dtypes, shapes, offsets). Not the weight
  bytes: hashing 30 GB on every run would cost minutes; a weight file rewritten in place with
  exactly the same size and header is not detected.
- ``tokenizer_fingerprint``: :meth:`ResponseTokenizer.fingerprint` (vocabulary, special tokens,
  chat template and its arguments, the pinned template date, the boundary mode, the renders of
  probe conversations, response-boundary version).
- ``dataset_fingerprint``: sha256 of the normalised rows (id + messages), in id order.
- ``max_length``, ``dtype``, ``backend``, ``shard_count``.

A rerun must agree on all of them to resume; otherwise :class:`ScoringMismatchError` names the
fields that differ. The manifest's ``info`` also records how the template behaves
(``template``: boundary mode, arguments, pinned date, whether it reads the clock, trims
content or strips reasoning, the end-of-turn marker), the row policy and the rows left out
while reading the data (``read_excluded``). Parallel sizes, batch sizes and the package version are recorded
(``info``) but do not block a resume: they change floating-point rounding, not what is scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from nemo_infifpo.atomic import write_json_atomic
from nemo_infifpo.data.rows import PreferenceRow
from nemo_infifpo.data.scored_set import canonical_json

__all__ = [
    "MANIFEST_NAME",
    "manifest_lock",
    "MANIFEST_VERSION",
    "RunIdentity",
    "ScoringIdentity",
    "ScoringMismatchError",
    "check_or_create_manifest",
    "check_or_create_manifest_file",
    "dataset_fingerprint",
    "model_fingerprint",
    "read_manifest",
    "read_manifest_file",
    "write_json_atomic",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_LOCK_NAME = ".lock.manifest"
MANIFEST_LOCK_WAIT_S = 120.0
MANIFEST_VERSION = 1

# Files that belong to the tokenizer (covered by the tokenizer fingerprint), so fixing a chat
# template in a model directory does not make the model look different.
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# Small files whose content (not just size) is part of the model's identity.
_HASHED_CONTENT_SUFFIXES = ("config.json", ".index.json")
_READ_CHUNK = 1 << 20



class RunIdentity(Protocol):
    """What a manifest records and compares (:class:`ScoringIdentity`, a generation stage's
    identity): everything that decides an output directory's results."""

    @property
    def shard_count(self) -> int: ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...

    def differences(self, other: Any) -> list[str]: ...


class ScoringMismatchError(RuntimeError):
    """Existing scores in an output directory were computed from different inputs."""


@dataclass(frozen=True)
class ScoringIdentity:
    """The inputs that decide a model's scores (see the module docstring)."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    dataset_fingerprint: str
    max_length: int | None
    dtype: str
    backend: str
    shard_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoringIdentity:
        fields = cls.__dataclass_fields__
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"scoring identity lacks {', '.join(missing)}")
        return cls(**{name: data[name] for name in fields})

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict()).encode("utf-8")).hexdigest()

    def differences(self, other: ScoringIdentity) -> list[str]:
        """``"field: this vs other"`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: {_short(mine[name])} vs {_short(theirs[name])}"
            for name in mine
            if mine[name] != theirs[name]
        ]


def _short(value: Any) -> str:
    # 64-hex fingerprints are unreadable in a message; 12 digits identify them well enough.
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return repr(value)


def model_fingerprint(path: str | Path) -> str:
    """sha256 over a model directory (HF or imported checkpoint); see the module docstring."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model not found: {root}")
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        relative = file.name if root.is_file() else file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue  # caches, lock files, editor droppings
        if file.name in _TOKENIZER_FILES:
            continue
        digest.update(f"{relative}\0{file.stat().st_size}\n".encode("utf-8"))
        if file.name.endswith(_HASHED_CONTENT_SUFFIXES):
            digest.update(_file_sha256(file).encode("ascii"))
        elif file.suffix == ".safetensors":
            digest.update(_safetensors_header(file))
    return digest.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then the JSON)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return b""
        length = int.from_bytes(prefix, "little")
        return handle.read(min(length, 100 << 20))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(rows: Iterable[PreferenceRow]) -> str:
    """sha256 of the normalised rows in id order: file format, key order and row order do not
    matter; any change to an id or a message does."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.id):
        digest.update(canonical_json(row.to_record()).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a scoring output directory, or None if there is none yet."""

    def problem(data: Mapping[str, Any]) -> str | None:
        if data.get("manifest_version") != MANIFEST_VERSION:
            return (
                f"manifest_version {data.get('manifest_version')!r}, this package writes "
                f"{MANIFEST_VERSION}; score into a new output_dir"
            )
        return None

    return read_manifest_file(output_dir, error=ScoringMismatchError, problem=problem)


def read_manifest_file(
    output_dir: str | Path,
    *,
    error: type[Exception],
    problem: Callable[[Mapping[str, Any]], str | None],
) -> dict[str, Any] | None:
    """The manifest in ``output_dir``, or None if there is none yet. Raises ``error`` when it
    is not JSON, or when ``problem(manifest)`` says why this reader cannot use it."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as bad_json:
        raise error(f"{path}: unreadable manifest ({bad_json.msg})") from None
    reason = problem(data)
    if reason is not None:
        raise error(f"{path}: {reason}")
    return data


def check_or_create_manifest(
    output_dir: str | Path,
    identity: ScoringIdentity,
    info: Mapping[str, Any],
    *,
    create: bool,
) -> dict[str, Any]:
    """Compare ``identity`` with the directory's manifest; write a new manifest when there is
    none and ``create`` is set (one writer per job). Raises :class:`ScoringMismatchError` on
    any difference."""

    def refuse(output_dir: Path, existing: Mapping[str, Any], differences: list[str]) -> None:
        raise ScoringMismatchError(
            f"{output_dir} already holds scores computed from different inputs "
            f"(recorded vs now): {'; '.join(differences)}. To score these inputs, choose a "
            "new output_dir, or delete this directory to start fresh."
        )

    return check_or_create_manifest_file(
        output_dir, identity, info, create=create, version=MANIFEST_VERSION, read=read_manifest, on_mismatch=refuse
    )


def check_or_create_manifest_file(
    output_dir: str | Path,
    identity: RunIdentity,
    info: Mapping[str, Any],
    *,
    create: bool,
    version: int,
    read: Callable[[Path], dict[str, Any] | None],
    on_mismatch: Callable[[Path, dict[str, Any], list[str]], None],
) -> dict[str, Any]:
    """Compare ``identity`` with the one recorded in the manifest that ``read`` finds in
    ``output_dir`` (read back with ``type(identity).from_dict``); write a new manifest
    (``manifest_version`` ``version``) when there is none and ``create`` is set. On a
    difference ``on_mismatch(output_dir, manifest, differences)`` raises to refuse, or returns
    to have the manifest replaced."""
    output_dir = Path(output_dir)
    # Array tasks start together: reading "no manifest" and writing one must be a single
    # step, or a task with other inputs could overwrite the first task's manifest.
    with manifest_lock(output_dir) if create else contextlib.nullcontext():
        existing = read(output_dir)
        if existing is not None:
            recorded = type(identity).from_dict(existing["identity"])
            differences = recorded.differences(identity)
            if not differences:
                return existing
            on_mismatch(output_dir, existing, differences)
        manifest = {
            "manifest_version": version,
            "identity": identity.to_dict(),
            "info": dict(info),
            "shards": [],
        }
        if create:
            write_json_atomic(output_dir / MANIFEST_NAME, manifest)
        return manifest


@contextlib.contextmanager
def manifest_lock(output_dir: str | Path) -> Iterator[None]:
    """Serialise the read-modify-write of a scoring directory's manifest between jobs (held for
    milliseconds; a job waits for it, and a lock of a killed job is taken over)."""
    from nemo_infifpo.atomic import remove_stale_temporaries
    from nemo_infifpo.locking import OutputLock

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(output_dir / MANIFEST_LOCK_NAME, stage="scoring manifest update").acquire(wait_s=MANIFEST_LOCK_WAIT_S)
    try:
        remove_stale_temporaries(output_dir / MANIFEST_NAME)
        yield
    finally:
        lock.release()
