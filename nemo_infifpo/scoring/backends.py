"""The two scoring back ends: megatron-core (the pivot's training engine) and Hugging Face.

Both take a right-padded batch ``tokens`` [B, S] with a ``response_mask`` [B, S] and return
``(sums float32 [B], counts int64 [B])`` on the CPU, through the project's log-prob code
(:mod:`nemo_infifpo.logprobs`): next-token shift, float32 log-softmax, masked sums.

- ``megatron``: :func:`nemo_infifpo.engine.forward.compute_sequence_logprobs` on a model loaded
  with :func:`nemo_infifpo.models.checkpoint.load_megatron_model` (HF directory or imported
  checkpoint), with tensor / pipeline / data parallelism, on padded micro-batches or, with
  ``batch.packing=true``, packed ones (the builder training's packing shares). Because
  training reads the pivot's step-0 log-probs through the same forward pass, the precomputed
  ``p0`` scores equal the training forward at step 0.
- ``hf``: ``transformers.AutoModelForCausalLM``, for architectures the engine does not cover
  (e.g. Gemma-3); every rank holds the whole model and scores its own slice of the batches.
  Log-probs come from the final hidden states with
  :func:`~nemo_infifpo.logprobs.token_logprobs_from_hidden`, only at the response positions, so
  a 256k vocabulary never materialises ``[tokens x vocab]`` logits for the prompt. Models whose
  logits are not a plain ``hidden @ lm_head.T`` (soft-capping, logit scaling) are detected by a
  probe on the first batch and scored from the model's own logits instead.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.logprobs import (
    sequence_logprob_sums,
    shift_for_next_token,
    token_logprobs_from_hidden,
    vocab_parallel_token_logprobs,
)

__all__ = [
    "BACKENDS",
    "DTYPES",
    "HFBackend",
    "MegatronBackend",
    "ScoringBackend",
    "ScoringWorld",
    "create_backend",
    "shutdown_distributed",
]

log = logging.getLogger(__name__)

BACKENDS = ("megatron", "hf")
# The dtypes a scoring job accepts (parsed by models.architecture.parse_dtype).
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
HF_LOGIT_MODES = ("auto", "hidden", "logits")

# Max |difference| between the hidden-state path and the model's own logits on the probe
# sequence, beyond which the model's logits are not plain `hidden @ W.T`. Soft-capping or a
# logit scale moves log-probs by whole nats; kernel rounding stays far below these.
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
_PROBE_TOKENS = 64


@dataclass(frozen=True)
class ScoringWorld:
    """This process's place in a (possibly multi-rank) scoring job."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    # The one rank of each model-parallel group whose results are sent to the writer (the
    # others computed the same numbers).
    contributes: bool = True
    device: torch.device = torch.device("cpu")

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def from_writer(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (so that all ranks follow one decision)."""
        if self.world_size == 1:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather(self, payload: Any) -> list[Any]:
        """Every rank's ``payload`` on every rank, in rank order."""
        if self.world_size == 1:
            return [payload]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, payload)
        return gathered

    def gather_to_writer(self, payload: Any) -> list[Any] | None:
        """Every contributing rank's ``payload`` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [payload]
        sent = payload if self.contributes else None
        gathered: list[Any] | None = [None] * self.world_size if self.is_writer else None
        torch.distributed.gather_object(sent, gathered, dst=0)
        if gathered is None:
            return None
        return [item for item in gathered if item is not None]


class ScoringBackend(Protocol):
    name: str
    world: ScoringWorld
    vocab_size: int

    def score(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums float32 [B], counts int64 [B])`` on the CPU for a right-padded batch."""
        ...

    def close(self) -> None: ...


def _check_token_range(tokens: torch.Tensor, vocab_size: int, model: str) -> None:
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise InputError(
            f"token id {largest} is outside the vocabulary of {model} ({vocab_size} ids): the "
            "tokenizer does not belong to this model (check tokenizer.path)"
        )


# --------------------------------------------------------------------------- megatron


class MegatronBackend:
    """Megatron-core GPTModel under tensor / pipeline / data parallelism."""

    name = "megatron"

    def __init__(
        self,
        model_path: str | Path,
        *,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        micro_batch_size: int | None = None,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        from nemo_infifpo.models.checkpoint import load_megatron_model

        self.world = open_world("megatron", tensor_model_parallel_size, pipeline_model_parallel_size)
        self._pipeline_size = pipeline_model_parallel_size
        self._micro_batch_size = micro_batch_size
        self._packing = packing
        self._pack_length = pack_length
        loaded = load_megatron_model(
            model_path,
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            params_dtype=dtype,
            device=self.world.device,
        )
        self.model = loaded.model
        self.vocab_size = int(loaded.vocab_size)
        self._model_path = str(model_path)

    def _micro(self, batch_size: int) -> int:
        if self._micro_batch_size is not None:
            return min(self._micro_batch_size, batch_size)
        # One micro-batch per pipeline stage keeps every stage busy; without a pipeline the
        # whole batch goes through at once.
        return -(-batch_size // self._pipeline_size)

    def score(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from nemo_infifpo.engine.forward import compute_sequence_logprobs

        _check_token_range(tokens, self.vocab_size, self._model_path)
        micro = self._micro(tokens.size(0))
        # Packed: bins of batch.pack_length tokens, by default what one padded micro-batch holds.
        pack_length = (self._pack_length or micro * tokens.size(1)) if self._packing else None
        sums, counts = compute_sequence_logprobs(
            self.model,
            tokens,
            response_mask,
            micro_batch_size=micro,
            vocab_size=self.vocab_size,
            pack_length=pack_length,
        )
        return sums.float().cpu(), counts.cpu()

    def close(self) -> None:
        # Only the model goes: the process group may serve further jobs in this process
        # (see shutdown_distributed).
        del self.model


# --------------------------------------------------------------------------- hugging face


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype``
    before. An older transformers would silently ignore the new name and load float32."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


class HFBackend:
    """``transformers.AutoModelForCausalLM``; data-parallel over the launched ranks."""

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        logits_mode: str = "auto",
    ) -> None:
        from transformers import AutoModelForCausalLM

        from nemo_infifpo.models.checkpoint import is_megatron_checkpoint

        if logits_mode not in HF_LOGIT_MODES:
            raise ConfigError(f"hf.logits must be one of {', '.join(HF_LOGIT_MODES)}, got {logits_mode!r}")
        path = Path(model_path)
        if is_megatron_checkpoint(path):
            raise ConfigError(
                f"{path} is a megatron checkpoint written by this package; the hf back end needs a "
                "Hugging Face model directory (use model.backend=megatron, or export it first)"
            )
        self.world = open_world("hf")
        device = self.world.device
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, **_dtype_kwarg(dtype)
        )
        self.model.to(device).eval()
        self._model_path = str(path)
        output = self.model.get_output_embeddings()
        if output is None:
            raise InputError(f"{path}: the model has no output embedding (lm_head); cannot score")
        self.vocab_size = int(output.weight.shape[0])
        self._mode = logits_mode  # "auto" resolves to "hidden" or "logits" on the first batch

    # -- the two ways to get token log-probs

    def _hidden_logps(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """float32 [B, S-1] log-probs at the masked positions (0 elsewhere), computed from the
        final hidden states at those positions only."""
        hidden = self.model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state
        weight = self.model.get_output_embeddings().weight
        selected = token_logprobs_from_hidden(hidden[mask], weight, targets[mask], vocab_size=self.vocab_size)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        out[mask] = selected
        return out

    def _model_logps(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float32 [B, S-1] log-probs from the model's own logits (whatever it does to them)."""
        logits = self.model(input_ids=inputs, use_cache=False).logits
        out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
        # One sequence at a time: the float32 copy of the logits then stays [S, V].
        for row in range(logits.size(0)):
            out[row] = vocab_parallel_token_logprobs(logits[row], targets[row], group=None)
        return out

    def _resolve_mode(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Use the hidden-state path only if it reproduces the model's own logits."""
        probe_inputs = inputs[:1, :_PROBE_TOKENS]
        probe_targets = targets[:1, :_PROBE_TOKENS]
        everywhere = torch.ones_like(probe_targets, dtype=torch.bool)
        own = self._model_logps(probe_inputs, probe_targets)
        try:
            hidden = self._hidden_logps(probe_inputs, probe_targets, everywhere)
            error = float((own - hidden).abs().max())
        except (AttributeError, NotImplementedError, TypeError, ValueError) as problem:
            error, hidden = float("inf"), None
            log.info("hidden-state scoring unavailable for %s (%s)", self._model_path, problem)
        tolerance = _PROBE_TOLERANCE.get(self.dtype, 5e-2)
        self._mode = "hidden" if error <= tolerance else "logits"
        log.info(
            "hf back end: %s log-probs (hidden-state path vs model logits differ by %.3g on the probe)",
            self._mode,
            error,
        )

    def score(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_token_range(tokens, self.vocab_size, self._model_path)
        inputs, targets, mask = shift_for_next_token(tokens.long(), response_mask)
        device = self.world.device
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        with torch.no_grad():
            if self._mode == "auto":
                self._resolve_mode(inputs, targets)
            if self._mode == "hidden":
                token_logps = self._hidden_logps(inputs, targets, mask)
            else:
                token_logps = self._model_logps(inputs, targets)
        sums, counts = sequence_logprob_sums(token_logps, mask)
        return sums.cpu(), counts.cpu()

    def close(self) -> None:
        del self.model


def shutdown_distributed() -> None:
    """Tear down megatron's groups and the process group, if any (end of a scoring process)."""
    # Only if megatron was used: importing it just to find nothing to tear down costs seconds.
    if "megatron.core" in sys.modules:
        from nemo_infifpo.engine.distributed import destroy_distributed

        destroy_distributed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def open_world(backend: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> ScoringWorld:
    """Join the job's ranks before any model is loaded (so they can share the preprocessing,
    :mod:`nemo_infifpo.scoring.preprocess`); the back end then loads its model into this world.
    Idempotent: a second call returns the same world."""
    from nemo_infifpo.engine.cpu_compat import running_on_cpu
    from nemo_infifpo.engine.distributed import init_distributed, read_launch_env

    if backend == "megatron":
        info = init_distributed(tensor_model_parallel_size, pipeline_model_parallel_size)
        return ScoringWorld(
            rank=info.rank,
            world_size=info.world_size,
            dp_rank=info.dp_rank,
            dp_size=info.dp,
            contributes=info.tp_rank == 0 and info.pp_rank == 0,
            device=info.device,
        )
    launch = read_launch_env()
    use_cuda = not running_on_cpu()
    device = torch.device("cuda", launch.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # before NCCL initialisation, which binds to it
    if launch.world_size > 1:
        _init_process_group(launch, use_cuda)
    return ScoringWorld(
        rank=launch.rank, world_size=launch.world_size, dp_rank=launch.rank, dp_size=launch.world_size,
        contributes=True, device=device,
    )


def _init_process_group(launch: Any, use_cuda: bool) -> None:
    # Data parallelism only: a plain process group, no megatron groups, no CPU patches.
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if use_cuda else "gloo"
    init_method = (
        "env://" if launch.launcher == "torchrun" else f"tcp://{launch.master_addr}:{launch.master_port}"
    )
    torch.distributed.init_process_group(
        backend=backend, init_method=init_method, rank=launch.rank, world_size=launch.world_size
    )


def create_backend(
    backend: str,
    model_path: str | Path,
    *,
    dtype: torch.dtype,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    micro_batch_size: int | None = None,
    packing: bool = False,
    pack_length: int | None = None,
    hf_logits: str = "auto",
) -> ScoringBackend:
    if backend == "megatron":
        return MegatronBackend(
            model_path,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            dtype=dtype,
            micro_batch_size=micro_batch_size,
            packing=packing,
            pack_length=pack_length,
        )
    if backend == "hf":
        if tensor_model_parallel_size != 1 or pipeline_model_parallel_size != 1:
            raise ConfigError(
                "the hf back end is data-parallel only: set model.tensor_model_parallel_size=1 and "
                "model.pipeline_model_parallel_size=1 (or use model.backend=megatron)"
            )
        if packing:
            raise ConfigError("batch.packing=true needs model.backend=megatron (the hf back end pads)")
        return HFBackend(model_path, dtype=dtype, logits_mode=hf_logits)
    raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
