"""Errors raised while describing, building, converting and loading models.

Each is a subclass of the builtin a caller would naturally catch (``ValueError`` for bad
configurations, ``FileNotFoundError`` for missing files), so generic handlers keep working
while tests and recipes can match the precise failure.
"""

from __future__ import annotations


class UnsupportedArchitectureError(ValueError):
    """The HF ``architectures`` entry has no registered family."""


class UnsupportedRopeScalingError(ValueError):
    """The HF config asks for a RoPE variant (longrope, yarn, ...) this package does not implement."""


class UnsupportedModelFeatureError(ValueError):
    """Some other HF config feature we cannot reproduce exactly (e.g. mixed sliding-window layers)."""


class ParallelLayoutError(ValueError):
    """Tensor/pipeline parallel sizes that do not fit the model's heads, layers or widths."""


class WeightShapeError(ValueError):
    """A stored tensor does not have the shape the architecture implies."""


class MissingWeightsError(FileNotFoundError):
    """A weight file, the weight index, or a tensor the mapping needs is absent."""


class UnexpectedWeightsError(ValueError):
    """The checkpoint holds tensors no mapping rule consumes (a different architecture?)."""


class CheckpointFormatError(ValueError):
    """A directory is neither a Hugging Face model nor a checkpoint written by this package."""
