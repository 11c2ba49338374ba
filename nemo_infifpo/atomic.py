"""Atomic, durable file writes: a temporary file in the target's directory, then a rename.

A reader, or the rerun of a killed job, sees either the old file or the complete new one,
never half of it. The data is fsynced before the rename and the directory after it, so a
node crash or power loss right after a write cannot leave an empty or zero-filled file under
the final name (on ext4/XFS/Lustre a rename may reach the disk before the data does).
Files get the permissions of an ordinary ``open()`` (``0666`` minus the process umask), not
the ``0600`` of :func:`tempfile.mkstemp`: other members of a shared project directory must be
able to read scores, manifests and checkpoints. Every file the project writes for other
stages goes through here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "atomic_path",
    "fsync_directory",
    "fsync_file",
    "process_umask",
    "remove_stale_temporaries",
    "write_json_atomic",
    "write_text_atomic",
]

_TMP_SUFFIX = ".tmp"


def process_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # No /proc (not Linux): the set-and-restore dance is the only portable way.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to stable storage (it may have been written by another handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | Path) -> None:
    """Make renames and new entries in directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # e.g. platforms without O_DIRECTORY: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success make it durable and rename it onto
    ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~process_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files that killed writes of ``path`` left behind; return them.

    Only call this while no other process can be writing ``path`` (the caller holds the
    output's lock, :mod:`nemo_infifpo.locking`): a live writer's temporary would go too.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*{_TMP_SUFFIX}"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Pretty, key-sorted JSON (stable bytes for the same data)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
