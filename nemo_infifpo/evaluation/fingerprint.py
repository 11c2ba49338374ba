"""What makes two evaluations of a model the same, so a rerun can skip finished models.

The settings fingerprint covers everything that can change a number in the results: the
model's files, the tasks and their local definitions (``include_path``), few-shot count,
limit, back end, dtype, chat template use, back-end arguments and the lm-eval version. Batch
size, device and output options are left out: they change how, not what, is computed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nemo_infifpo.evaluation.config import EvalConfig, ModelSpec

__all__ = ["evaluation_settings", "settings_fingerprint"]

# Files larger than this are identified by size and modification time instead of content.
_HASH_CONTENT_BELOW = 16 * 1024 * 1024


def evaluation_settings(config: EvalConfig, model: ModelSpec) -> dict[str, Any]:
    """The inputs of one model's evaluation, as stored next to its results."""
    from importlib.metadata import version

    return {
        "model_path": str(Path(model.path).resolve()),
        "model_files": _tree_digest(Path(model.path)),
        "tasks": list(config.tasks),
        "include_path": {str(Path(p).resolve()): _tree_digest(Path(p)) for p in config.include_path},
        "num_fewshot": config.num_fewshot,
        "limit": config.limit,
        "backend": config.backend,
        "dtype": config.dtype,
        "apply_chat_template": config.apply_chat_template,
        "model_args": dict(sorted(config.model_args.items())),
        "bootstrap_iters": config.bootstrap_iters,
        "lm_eval_version": version("lm_eval"),
    }


def settings_fingerprint(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tree_digest(root: Path) -> str:
    """One hash over every file under ``root`` (or ``root`` itself): names and contents."""
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        if any(part.startswith(".") for part in path.relative_to(root.parent if root.is_file() else root).parts):
            continue  # temporary files of an interrupted write, caches
        stat = path.stat()
        digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}\0{stat.st_size}\0".encode())
        if stat.st_size < _HASH_CONTENT_BELOW:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]
