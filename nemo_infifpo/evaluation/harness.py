"""One model through lm-evaluation-harness's Python API (``lm_eval.simple_evaluate``).

The ``hf`` back end is lm-eval's transformers model (CPU or one GPU; ``model_args`` can add
``parallelize=True`` for several); ``vllm`` is its vLLM model (``model_args`` takes
``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ...).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nemo_infifpo.evaluation.config import EvalConfig, ModelSpec

__all__ = ["evaluate_model", "json_safe"]

log = logging.getLogger(__name__)


def evaluate_model(config: EvalConfig, model: ModelSpec, manager: Any) -> dict[str, Any]:
    """lm-eval's results for ``model`` on ``config.tasks`` (``samples`` included only when
    ``config.log_samples``)."""
    import lm_eval

    model_args: dict[str, Any] = {"pretrained": model.path, "dtype": config.dtype, **config.model_args}
    device = None
    if config.backend == "hf":
        device = config.device or _default_device()
    log.info("evaluating %s (%s) on %s with %s", model.name, model.path, ", ".join(config.tasks), config.backend)
    results = lm_eval.simple_evaluate(
        model=config.backend,
        model_args=model_args,
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        batch_size=config.batch_size,
        device=device,
        limit=config.limit,
        bootstrap_iters=config.bootstrap_iters,
        log_samples=config.log_samples,
        apply_chat_template=config.apply_chat_template,
        # Few-shot examples as earlier chat turns: only meaningful with a chat template.
        fewshot_as_multiturn=config.apply_chat_template,
        task_manager=manager,
        confirm_run_unsafe_code=config.confirm_run_unsafe_code,
    )
    if results is None:  # not the reporting rank of a multi-process back end
        raise RuntimeError(f"lm-eval returned no results for {model.name}")
    return json_safe(dict(results))


def json_safe(value: Any) -> Any:
    """lm-eval's results with numpy scalars, sets and the like turned into JSON values."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
