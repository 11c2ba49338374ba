"""The two generation back ends: transformers ``generate`` (CPU or one GPU; development, CI,
models vLLM does not serve) and vLLM (offline batch generation, tensor parallel; clusters).

Both take requests (prompt id, prompt token ids) and return, per request, ``n``
:class:`~nemo_infifpo.generation.sampling.RawSample`; what a sample means is decided in one
place (:func:`~nemo_infifpo.generation.sampling.finish_sample`). vLLM is imported only when
used: it pins its own torch build and usually lives in another environment or container.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.generation.sampling import RawSample, SamplingSettings, request_seed

__all__ = [
    "BACKENDS",
    "Generator",
    "HFGenerator",
    "Request",
    "VLLMGenerator",
    "create_generator",
    "plan_generation_batches",
    "raw_samples_from_vllm",
    "vllm_requests",
]

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Request:
    prompt_id: str
    prompt_ids: list[int]


class Generator(Protocol):
    def generate(self, requests: Sequence[Request], sampling: SamplingSettings, stop_ids: Sequence[int]) -> list[list[RawSample]]:
        """``n`` samples per request, in request order."""
        ...

    def close(self) -> None: ...


def plan_generation_batches(lengths: Sequence[int], n: int, max_tokens: int, max_prompts: int) -> list[list[int]]:
    """Request indices grouped by prompt length (longest first), each batch within
    ``max_tokens`` padded prompt tokens x ``n`` samples and ``max_prompts`` prompts."""
    from nemo_infifpo.scoring.batching import plan_batches

    # k prompts padded to length L cost L * k * n tokens, within max_tokens exactly when L * k
    # is within max_tokens // n (when n > max_tokens, every prompt is a batch of its own).
    budget = max(1, max_tokens // n)
    return [list(batch.indices) for batch in plan_batches(lengths, budget, max_sequences=max_prompts)]


class HFGenerator:
    """transformers ``generate``, left-padded batches. Each batch is seeded from the run's seed
    and the batch's first prompt id, so a shard computed twice gives the same samples."""

    def __init__(self, model_path: str | Path, *, dtype: Any, pad_id: int, max_tokens: int = 8192, max_prompts: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"model.path {str(model_path)!r}: cannot load a causal language model ({error})") from None
        self.model.to(self.device).eval()
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.max_prompts = max_prompts

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings, stop_ids: Sequence[int]) -> list[list[RawSample]]:
        import torch
        from transformers import GenerationConfig

        # A fresh config, not merged with the model's generation_config defaults (top_k=50,
        # a preferred temperature, repetition penalties): the samples follow sampling.* only.
        config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else float(sampling.temperature),
            top_p=None if sampling.greedy else float(sampling.top_p),
            top_k=None if sampling.greedy else 0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=list(stop_ids),
            pad_token_id=self.pad_id,
        )
        self.model.generation_config = config
        results: list[list[RawSample]] = [[] for _ in requests]
        lengths = [len(r.prompt_ids) for r in requests]
        for batch in plan_generation_batches(lengths, sampling.n, self.max_tokens, self.max_prompts):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - lengths[i]:] = torch.tensor(requests[i].prompt_ids, dtype=torch.long)
                mask[row, width - lengths[i]:] = 1
            torch.manual_seed(request_seed(sampling.seed, requests[batch[0]].prompt_id))
            with torch.no_grad():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            generated = out[:, width:].cpu().tolist()
            for row, i in enumerate(batch):
                for sample in range(sampling.n):
                    results[i].append(RawSample(token_ids=generated[row * sampling.n + sample]))
        return results

    def close(self) -> None:
        del self.model


def vllm_requests(
    requests: Sequence[Request], sampling: SamplingSettings, stop_ids: Sequence[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """vLLM's inputs: token prompts, and the keyword arguments of one ``SamplingParams`` per
    request (a per-prompt seed, so samples do not depend on the batch)."""
    prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
    params = [
        {
            "n": sampling.n,
            "temperature": float(sampling.temperature),
            "top_p": 1.0 if sampling.greedy else float(sampling.top_p),
            "top_k": -1,
            "max_tokens": sampling.max_new_tokens,
            "seed": request_seed(sampling.seed, r.prompt_id),
            "stop_token_ids": list(stop_ids),
            "skip_special_tokens": True,
        }
        for r in requests
    ]
    return prompts, params


def raw_samples_from_vllm(request_output: Any, n: int) -> list[RawSample]:
    """A vLLM ``RequestOutput`` as ``n`` raw samples in sample order; refuses anything else
    (a missing sample or an unknown finish reason is a back-end problem, not data)."""
    outputs = sorted(request_output.outputs, key=lambda o: o.index)
    if len(outputs) != n:
        raise RuntimeError(f"vLLM returned {len(outputs)} samples for a request of n={n}")
    samples = []
    for output in outputs:
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a sample with {output.finish_reason!r} (expected stop or length)")
        samples.append(RawSample(token_ids=list(output.token_ids), stopped=output.finish_reason == "stop"))
    return samples


class VLLMGenerator:
    """vLLM offline generation (``LLM.generate`` on token prompts), tensor parallel."""

    def __init__(self, model_path: str | Path, *, dtype: str, tensor_model_parallel_size: int, seed: int,
                 engine_args: Mapping[str, Any] | None = None) -> None:
        try:
            from vllm import LLM
        except ImportError as error:
            raise ConfigError(
                f"model.backend=vllm needs the vllm package in this interpreter ({error}); run the stage with an "
                "environment that has it (Slurm: INFIFPO_GENERATE_PYTHON / INFIFPO_GENERATE_CONTAINER_IMAGE), or "
                "use model.backend=hf"
            ) from None
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype,
                       tensor_parallel_size=tensor_model_parallel_size, seed=seed, **dict(engine_args or {}))

    def generate(self, requests: Sequence[Request], sampling: SamplingSettings, stop_ids: Sequence[int]) -> list[list[RawSample]]:
        from vllm import SamplingParams

        prompts, params = vllm_requests(requests, sampling, stop_ids)
        outputs = self.llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
        return [raw_samples_from_vllm(output, sampling.n) for output in outputs]

    def close(self) -> None:
        del self.llm


def create_generator(backend: str, model_path: str | Path, *, dtype: str, tensor_model_parallel_size: int, seed: int,
                     pad_id: int, max_tokens: int, max_prompts: int, engine_args: Mapping[str, Any] | None = None) -> Generator:
    if backend == "vllm":
        return VLLMGenerator(model_path, dtype=dtype, tensor_model_parallel_size=tensor_model_parallel_size,
                             seed=seed, engine_args=engine_args)
    if backend == "hf":
        from nemo_infifpo.models.architecture import parse_dtype

        return HFGenerator(model_path, dtype=parse_dtype(dtype), pad_id=pad_id, max_tokens=max_tokens, max_prompts=max_prompts)
    raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
