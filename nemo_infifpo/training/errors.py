"""Errors that stop a training run (configuration errors live in :mod:`.config`)."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A non-finite log-prob, loss or gradient norm: the run stops before the update, so the
    weights in memory and every checkpoint on disk stay as they were."""
