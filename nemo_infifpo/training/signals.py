"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's pre-emption and time-limit warnings).

The handler only records the signal; the loop finishes the step it is in, saves a checkpoint
and returns. Signals reach ranks at different times (or only some ranks), so the decision is
agreed with one all-reduce per step: every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the recipe installs StopSignals before its heavy imports,
# so that a signal during start-up (imports, model load) is recorded instead of killing ranks.

__all__ = ["StopSignals", "stop_signals_deferred"]

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager: catches the stop signals while active, restores the old handlers after."""

    def __init__(self, signals: tuple[signal.Signals, ...] = _DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def stop_requested(self, device: "torch.device") -> bool:
        """True on every rank if any rank has received a stop signal (collective)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def stop_signals_deferred(signals: tuple[signal.Signals, ...] = _DEFAULT_SIGNALS) -> Iterator[None]:
    """Hold the stop signals back while a checkpoint is written; deliver them afterwards.

    Slurm (and srun forwarding) signals every process of the step, including helper processes
    that dist_checkpointing starts during a save (its async writer's multiprocessing manager);
    with the default disposition they die and the save fails. A blocked signal stays pending
    instead: this process handles it once the block lifts, and helpers started meanwhile
    inherit the block, so they finish their work.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
