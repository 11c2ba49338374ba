"""Declarative Hugging Face <-> megatron-core weight mapping and the one engine that runs it.

A family describes its weights as a table of rules (plain data, see ``families/``):

* :class:`Copy` - one HF tensor is one megatron tensor, split along ``tp_axis`` across
  tensor-parallel ranks (``None``: replicated). ``pads_vocab`` marks embedding/output rows,
  which megatron pads to a TP-friendly vocabulary size; the padding rows are zero on
  import and dropped on export.
* :class:`QKV` - HF query/key/value (fused ``qkv_proj`` or separate ``q/k/v_proj``, weight or
  bias) <-> megatron ``linear_qkv``, whose rows are interleaved per query group:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``. TP ranks hold
  whole groups, so a TP shard is a contiguous row block of that layout.
* :class:`GatedMLP` - HF gate/up (fused ``gate_up_proj`` = [gate; up], or separate) <->
  megatron ``linear_fc1``. Each TP rank holds ``[gate shard r; up shard r]``, so a shard is
  *not* a contiguous block of the unsharded tensor.

Megatron names are written in the local-spec layout (``input_layernorm``,
``pre_mlp_layernorm``); the Transformer Engine spec fuses those norms into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, and
:func:`canonical_megatron_name` folds that layout onto the same table. ``{layer}`` in a name
is the *global* layer index; the engine reads it from each megatron layer's
``layer_number``, so pipeline-stage offsets (even or uneven) need no special handling.

The same rules run in both directions: :func:`load_hf_weights` fills this rank's
parameters from HF tensors; :func:`iter_hf_tensors` gathers TP shards and pipeline stages
back into HF tensors on global rank 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence, Union

import torch
import torch.distributed as dist

from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.errors import MissingWeightsError, WeightShapeError

LAYER = "{layer}"

# Transformer Engine spec name -> local spec name, for the layer-relative suffix.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


# --------------------------------------------------------------------------- rules (data)


@dataclass(frozen=True)
class Copy:
    megatron: str
    hf: str
    tp_axis: int | None = None
    pads_vocab: bool = False
    # False for a second megatron copy of a tensor exported elsewhere (the output layer of a
    # tied model on the last pipeline stage mirrors the first stage's embedding).
    exported: bool = True

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)


@dataclass(frozen=True)
class QKV:
    megatron: str
    hf_names: tuple[str, ...]  # (fused qkv,) or (q, k, v)
    exported: bool = True


@dataclass(frozen=True)
class GatedMLP:
    megatron: str
    hf_names: tuple[str, ...]  # (fused gate_up,) or (gate, up)
    exported: bool = True


WeightRule = Union[Copy, QKV, GatedMLP]


def is_layer_rule(rule: WeightRule) -> bool:
    return LAYER in rule.megatron


def hf_names_for(rule: WeightRule, layer: int | None) -> tuple[str, ...]:
    return tuple(n.replace(LAYER, str(layer)) for n in rule.hf_names) if layer is not None else rule.hf_names


def expected_hf_names(rules: Sequence[WeightRule], num_layers: int) -> list[str]:
    """Every HF tensor name the table reads, for all layers, in table order, without repeats."""
    names: dict[str, None] = {}
    for rule in rules:
        layers: Iterable[int | None] = range(num_layers) if is_layer_rule(rule) else (None,)
        for layer in layers:
            names.update(dict.fromkeys(hf_names_for(rule, layer)))
    return list(names)


def exported_hf_names(rules: Sequence[WeightRule], num_layers: int) -> list[str]:
    return expected_hf_names([r for r in rules if r.exported], num_layers)


# --------------------------------------------------------------------------- tensor transforms


@dataclass(frozen=True)
class ShardContext:
    """What a transform needs to know besides the tensors: the model shape and the TP layout."""

    arch: ArchitectureSpec
    padded_vocab_size: int
    tp_rank: int = 0
    tp_size: int = 1


def _split_fused_qkv(fused: torch.Tensor, arch: ArchitectureSpec) -> list[torch.Tensor]:
    q_rows = arch.num_attention_heads * arch.head_dim
    kv_rows = arch.num_query_groups * arch.head_dim
    return list(fused.split([q_rows, kv_rows, kv_rows], dim=0))


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchitectureSpec) -> torch.Tensor:
    groups, d, per_group = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1
    )
    return grouped.reshape(groups * (per_group + 2) * d, *rest)


def _deinterleave_qkv(full: torch.Tensor, arch: ArchitectureSpec) -> list[torch.Tensor]:
    groups, d, per_group = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    rest = full.shape[1:]
    q, k, v = full.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def to_megatron_shard(rule: WeightRule, hf_tensors: Sequence[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
    """This TP rank's megatron tensor for ``rule`` from the full HF tensors it names."""
    r, n = ctx.tp_rank, ctx.tp_size
    if isinstance(rule, Copy):
        (tensor,) = hf_tensors
        if rule.pads_vocab:
            tensor = _pad_rows(tensor, ctx.padded_vocab_size)
        return tensor if rule.tp_axis is None else tensor.chunk(n, dim=rule.tp_axis)[r]
    if isinstance(rule, QKV):
        q, k, v = _split_fused_qkv(hf_tensors[0], ctx.arch) if len(hf_tensors) == 1 else hf_tensors
        return _interleave_qkv(q, k, v, ctx.arch).chunk(n, dim=0)[r]
    if isinstance(rule, GatedMLP):
        gate, up = hf_tensors[0].chunk(2, dim=0) if len(hf_tensors) == 1 else hf_tensors
        return torch.cat([gate.chunk(n, dim=0)[r], up.chunk(n, dim=0)[r]], dim=0)
    raise TypeError(f"unknown weight rule {rule!r}")


def to_hf_tensors(rule: WeightRule, tp_shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
    """The full HF tensors (in ``rule.hf_names`` order) from every TP rank's shard, in rank order."""
    if isinstance(rule, Copy):
        if rule.tp_axis is None:
            return [tp_shards[0]]
        full = torch.cat(list(tp_shards), dim=rule.tp_axis)
        return [full[: ctx.arch.vocab_size] if rule.pads_vocab else full]
    if isinstance(rule, QKV):
        q, k, v = _deinterleave_qkv(torch.cat(list(tp_shards), dim=0), ctx.arch)
        return [torch.cat([q, k, v], dim=0)] if len(rule.hf_names) == 1 else [q, k, v]
    if isinstance(rule, GatedMLP):
        halves = [shard.chunk(2, dim=0) for shard in tp_shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return [torch.cat([gate, up], dim=0)] if len(rule.hf_names) == 1 else [gate, up]
    raise TypeError(f"unknown weight rule {rule!r}")


# --------------------------------------------------------------------------- binding to a model

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def canonical_megatron_name(name: str) -> str:
    """Fold Transformer Engine's fused-norm parameter names onto the local-spec names."""
    match = _LAYER_PREFIX.match(name)
    if match and match.group(2) in _TE_FUSED_NORMS:
        return f"decoder.layers.{match.group(1)}.{_TE_FUSED_NORMS[match.group(2)]}"
    return name


@dataclass(frozen=True)
class BoundWeight:
    """One parameter of this rank's model, with the rule and global layer that explain it."""

    param_name: str
    param: torch.nn.Parameter
    rule: WeightRule
    rule_index: int  # position of ``rule`` in its table: identifies it across ranks
    layer: int | None  # global layer index, None outside the decoder layers

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.rule_index, self.layer)


def _rule_patterns(rules: Sequence[WeightRule]) -> list[tuple[re.Pattern[str], int]]:
    patterns = []
    for index, rule in enumerate(rules):
        regex = re.escape(rule.megatron).replace(re.escape(LAYER), r"(\d+)")
        patterns.append((re.compile(f"^{regex}$"), index))
    return patterns


def bind_rules(model: torch.nn.Module, rules: Sequence[WeightRule]) -> list[BoundWeight]:
    """Match every parameter of ``model`` (one pipeline stage's GPTModel) to its rule.

    A parameter no rule explains is an error: it would otherwise keep its random init.
    """
    layer_numbers = _global_layer_indices(model)
    patterns = _rule_patterns(rules)
    bound: list[BoundWeight] = []
    for name, param in model.named_parameters():
        if param.numel() == 0:
            continue  # placeholder of a disabled feature (e.g. an absent bias), holds no weights
        canonical = canonical_megatron_name(name)
        for pattern, index in patterns:
            match = pattern.match(canonical)
            if match is None:
                continue
            layer = layer_numbers[int(match.group(1))] if match.groups() else None
            bound.append(BoundWeight(name, param, rules[index], index, layer))
            break
        else:
            raise KeyError(f"no weight-mapping rule for megatron parameter {name!r}")
    return bound


def _global_layer_indices(model: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global (0-based) layer index, from megatron's own numbering."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return {}
    return {local: layer.layer_number - 1 for local, layer in enumerate(decoder.layers)}


# --------------------------------------------------------------------------- HF -> megatron


class TensorSource(Protocol):
    """Anything that hands out full HF tensors by name (an open checkpoint, a state dict)."""

    def get(self, name: str) -> torch.Tensor: ...


class StateDictSource:
    """:class:`TensorSource` over an in-memory HF state dict."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._tensors = state_dict

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise MissingWeightsError(f"tensor {name!r} is missing from the HF state dict")
        return self._tensors[name]


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, rules: Sequence[WeightRule], source: TensorSource, ctx: ShardContext) -> None:
    """Fill every parameter of this rank's ``model`` from ``source``, one tensor at a time."""
    for weight in bind_rules(model, rules):
        names = hf_names_for(weight.rule, weight.layer)
        shard = to_megatron_shard(weight.rule, [source.get(n) for n in names], ctx)
        if tuple(shard.shape) != tuple(weight.param.shape):
            raise WeightShapeError(
                f"megatron parameter {weight.param_name!r} built from {', '.join(names)}: "
                f"expected shape {tuple(weight.param.shape)}, got {tuple(shard.shape)}"
            )
        weight.param.copy_(shard)


# --------------------------------------------------------------------------- megatron -> HF


def _default_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    return param.detach()


def iter_hf_tensors(
    model: torch.nn.Module,
    rules: Sequence[WeightRule],
    ctx: ShardContext,
    *,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor | None] = _default_tensor,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full CPU tensor)`` on global rank 0; on other ranks yield nothing.

    Collective: every rank of the job must iterate it to the end (data-parallel replicas
    other than the first return at once). TP shards are all-gathered inside each stage and
    each tensor is then sent from its pipeline stage to stage 0, one tensor at a time, so
    rank 0 never holds more than one full tensor of the model at once (plus what the
    consumer keeps). ``tensor_of`` picks what to export: the weights by default, e.g.
    ``lambda p: p.grad`` for gradients.
    """
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized() and ps.get_data_parallel_rank() != 0:
        return
    distributed = dist.is_initialized() and ps.model_parallel_is_initialized()
    tp_group = ps.get_tensor_model_parallel_group() if distributed else None
    pp_group = ps.get_pipeline_model_parallel_group() if distributed else None
    tp_size = dist.get_world_size(tp_group) if distributed else 1
    tp_rank = dist.get_rank(tp_group) if distributed else 0
    pp_ranks = dist.get_process_group_ranks(pp_group) if distributed else [0]
    pp_rank = pp_ranks.index(dist.get_rank()) if distributed else 0

    local = {w.key: w for w in bind_rules(model, rules) if w.rule.exported}
    # Which stage owns which (rule, layer): one object exchange along the pipeline.
    owners: dict[tuple[int, int | None], int] = {}
    if len(pp_ranks) > 1:
        gathered: list[list[tuple[int, int | None]] | None] = [None] * len(pp_ranks)
        dist.all_gather_object(gathered, sorted(local, key=_key_order), group=pp_group)
        for stage, keys in enumerate(gathered):
            for key in keys or ():
                owners.setdefault(tuple(key), stage)  # type: ignore[arg-type]
    else:
        owners = {key: 0 for key in local}

    for key in sorted(owners, key=_key_order):
        stage = owners[key]
        rule = rules[key[0]]
        names = hf_names_for(rule, key[1])
        tensors: list[torch.Tensor] | None = None
        if stage == pp_rank:
            tensors = _gather_tp(local[key], rule, ctx, tensor_of, tp_group, tp_size, tp_rank)
        if stage != 0 and tp_rank == 0:
            if pp_rank == stage:
                _send_tensors(tensors or [], dst=pp_ranks[0])
            elif pp_rank == 0:
                tensors = _recv_tensors(src=pp_ranks[stage])
        if pp_rank == 0 and tp_rank == 0 and tensors is not None:
            for name, tensor in zip(names, tensors):
                yield name, tensor


def _key_order(key: tuple[int, int | None]) -> tuple[int, int, int]:
    rule_index, layer = key
    # Non-layer tensors (embedding, final norm, output) sort by table order around the layers.
    return (0 if layer is None else 1, -1 if layer is None else layer, rule_index)


def _gather_tp(
    weight: BoundWeight,
    rule: WeightRule,
    ctx: ShardContext,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor | None],
    tp_group: dist.ProcessGroup | None,
    tp_size: int,
    tp_rank: int,
) -> list[torch.Tensor] | None:
    tensor = tensor_of(weight.param)
    if tensor is None:
        raise ValueError(f"nothing to export for {weight.param_name!r} (e.g. no gradient)")
    tensor = tensor.detach().contiguous()
    if tp_size == 1:
        shards = [tensor]
    elif isinstance(rule, Copy) and rule.tp_axis is None:
        shards = [tensor]  # replicated: every TP rank holds the same values
    else:
        shards = [torch.empty_like(tensor) for _ in range(tp_size)]
        dist.all_gather(shards, tensor, group=tp_group)
    if tp_rank != 0:
        return None
    return [t.cpu() for t in to_hf_tensors(rule, [s.cpu() for s in shards], ctx)]


def _send_tensors(tensors: list[torch.Tensor], dst: int) -> None:
    device = _comm_device()
    meta = [(tuple(t.shape), t.dtype) for t in tensors]
    dist.send_object_list([meta], dst=dst, device=device)
    for tensor in tensors:
        dist.send(tensor.contiguous().to(device), dst=dst)


def _recv_tensors(src: int) -> list[torch.Tensor]:
    device = _comm_device()
    holder: list[list[tuple[tuple[int, ...], torch.dtype]] | None] = [None]
    dist.recv_object_list(holder, src=src, device=device)
    received = []
    for shape, dtype in holder[0] or []:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buffer, src=src)
        received.append(buffer.cpu())
    return received


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
