"""Run megatron-core on CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places that matter for GPTModel
forward/backward and the pipeline schedules. :func:`enable_cpu_compat` patches exactly
those places so the same code runs on a laptop or in CI with gloo ranks. It is the only
place in the project that knows about these patches; it is applied only when the caller
has decided the run is on CPU (see :func:`running_on_cpu`), never on a GPU run.

Each patch below says why it is needed. Where megatron reaches a CUDA call through a module
attribute we patch that attribute inside megatron; ``torch.cuda.current_device`` is the one
global patch, because megatron calls it from dozens of modules (some imported lazily), and on a
CPU-only run it would raise anyway.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator

import torch

_CPU = torch.device("cpu")
_ENABLED = False

# Tensor factories that megatron calls with ``device="cuda"`` inside the pipeline modules.
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like")


def running_on_cpu() -> bool:
    """True when this process should run megatron on CPU (no usable CUDA device).

    ``NEMO_INFIFPO_FORCE_CPU=1`` forces the CPU path even on a GPU machine (tests, debugging).
    """
    if os.environ.get("NEMO_INFIFPO_FORCE_CPU", "0") not in ("", "0", "false", "False"):
        return True
    return not torch.cuda.is_available()


def is_cpu_compat_enabled() -> bool:
    return _ENABLED


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, ``0``, a cuda device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CpuCudaNamespace:
    """Stands in for ``torch.cuda`` inside a patched megatron module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU collectives (gloo) are synchronous once ``wait()`` returns; nothing to flush.
        return None


class _CpuTorchProxy(types.ModuleType):
    """A view of ``torch`` that creates tensors on the CPU when asked for CUDA.

    Installed as the ``torch`` global of a single megatron module, so only that module's
    ``torch.zeros(..., device="cuda")`` calls are redirected; real ``torch`` is untouched.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()
        for name in _FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _redirect(factory: Any) -> Any:
        def on_cpu(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        on_cpu.__name__ = getattr(factory, "__name__", "factory")
        return on_cpu

    @staticmethod
    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        # schedules.forward_step opens ``torch.autocast("cuda", ...)`` when config.enable_autocast.
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's CUDA RNG tracker that forks the CPU generator instead.

    megatron draws tensor-parallel weight init and dropout inside
    ``get_cuda_rng_tracker().fork()``; its tracker saves/restores CUDA generator state,
    which does not exist on CPU. This keeps the same named-state semantics on the CPU
    generator, so TP ranks still draw from distinct streams inside ``fork()``.
    """

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._initialized

    def reset(self) -> None:
        self._initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            # No seed was registered (e.g. a unit test building layers without
            # init_distributed): behave like the default generator rather than fail.
            yield
            return
        outer = torch.get_rng_state()
        previous_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)
            self._current_state_name = previous_name


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    keep = torch.ones(sq, skv, dtype=torch.bool)
    keep = keep.triu(diagonal=skv - sq - window_size[0]).tril(diagonal=skv - sq + window_size[1])
    return ~keep


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # get_cuda_rng_tracker() returns this module global once the INITIALIZED flag is set;
    # every megatron caller goes through that function, so this swaps the tracker everywhere.
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute (tensor_parallel.random.checkpoint) snapshots "the CUDA RNG state"
    # around the recomputed forward; on CPU there is none, the CPU state is saved separately.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def seed_cpu_model_parallel(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU counterpart of ``tensor_parallel.model_parallel_cuda_manual_seed``.

    Same stream layout as megatron (data-parallel stream = ``seed``, tensor-parallel stream
    = ``seed + 2718 + tp_rank``, expert stream = ``seed + 1024 + 100*ep_rank + etp_rank``),
    so a CPU run draws the same kind of per-rank randomness a GPU run does.
    """
    from megatron.core.tensor_parallel import random as mrandom

    _install_rng_tracker()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def enable_cpu_compat() -> None:
    """Apply every patch megatron-core needs to run on CPU/gloo. Safe to call repeatedly."""
    global _ENABLED
    if _ENABLED:
        return

    # 1. RoPE (`inv_freq.to(torch.cuda.current_device())`), tensor-parallel layers and
    #    mappings (`torch.empty(..., device=torch.cuda.current_device())`), GPTModel, attention
    #    and p2p all ask torch for "the current CUDA device". Megatron calls it from many
    #    modules, some imported lazily, so this is patched once on torch.cuda itself. On a
    #    CPU-only run the original raises, so nothing that worked before changes meaning.
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]

    # 2. The CUDA RNG tracker: see CpuRNGStatesTracker.
    _install_rng_tracker()

    # 3. The pipeline schedules allocate `total_num_tokens` with device="cuda" and open
    #    torch.autocast("cuda"); p2p_communication calls torch.cuda.synchronize() after
    #    batch_isend_irecv. Give just these two modules a CPU view of torch.
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    for module in (schedules, p2p_communication):
        if not isinstance(module.torch, _CpuTorchProxy):
            module.torch = _CpuTorchProxy()

    # 4. The softmax of the local attention spec falls back to megatron's default causal
    #    mask (transformer.utils.get_default_causal_mask / the sliding-window variant) when
    #    no attention_mask is passed, and those build it with device="cuda". fused_softmax
    #    imported them by name, so the CPU versions replace its references. (Not by proxying
    #    transformer.utils' torch: that module holds torch.compile'd functions that must see
    #    the real torch.)
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # 5. dist_checkpointing's writers call torch.cuda.synchronize() after staging tensors in
    #    host memory and build small status tensors on the current CUDA device; there is
    #    nothing to wait for on the CPU, so these modules get the same CPU view of torch.
    from megatron.core.dist_checkpointing.strategies import (
        async_utils,
        filesystem_async,
        state_dict_saver,
    )

    for module in (filesystem_async, async_utils, state_dict_saver):
        if not isinstance(module.torch, _CpuTorchProxy):
            module.torch = _CpuTorchProxy()

    _ENABLED = True


@contextlib.contextmanager
def tensors_stay_on_cpu() -> Iterator[None]:
    """Make ``Tensor.cuda()`` the identity while a CPU model is being built.

    With tied embeddings and PP > 1, megatron's LanguageModule moves the shared embedding with
    ``weight.data.cuda()`` before all-reducing it over the embedding group: on a CPU-only
    torch that raises, and on a GPU machine forced onto the CPU it would hand gloo a CUDA
    tensor. Scoped to model construction rather than patched globally, because elsewhere a
    ``.cuda()`` call must keep its meaning.
    """
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]
