"""Worker: a tiny GPTModel scored at TP=1, TP=2 and PP=2 from the same weights.

Usage: ``torchrun --nproc_per_node=2 forward_parallel.py OUT_DIR``. In one launch:

1. TP=1 (data-parallel 2): build the model with a fixed seed, keep its full state dict,
   score a batch with ``compute_sequence_logprobs`` and take the gradient of the summed
   response log-probs w.r.t. every weight (the reference). Also check the scores against a
   plain full-vocabulary ``log_softmax`` of the model's logits.
2. TP=2: load the TP shards of those weights; compare scores and the TP-gathered gradients.
3. PP=2: load each stage's layers; compare scores (forward-only schedule) and gradients from
   megatron's forward-backward pipeline schedule.

Every rank writes ``OUT_DIR/rank{r}.json`` with max abs errors; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
from nemo_infifpo.engine.forward import causal_attention_mask, compute_sequence_logprobs
from nemo_infifpo.logprobs import shift_for_next_token, vocab_parallel_token_logprobs

VOCAB = 101  # real vocabulary; the output layer is padded to an even size for TP=2
PADDED_VOCAB = 102
NUM_LAYERS = 2
SEQ = 12
BATCH = 5
MICRO = 2


def build_model(tp: int, pp: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,  # SwiGLU, as in Phi-4: exercises the fc1 shard layout
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=PADDED_VOCAB,
        max_sequence_length=64,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token batch with a response span per row (different prompt/response lengths)."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    tokens[:, -1] = VOCAB - 1  # the highest real id appears as a target
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for row, (start, end) in enumerate([(3, 12), (5, 9), (1, 12), (6, 7), (2, 10)]):
        mask[row, start:end] = True
    return tokens, mask


def global_layer_name(name: str, layer_offset: int) -> str:
    """Map a stage-local ``decoder.layers.{i}.`` key to the full model's layer index."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) tensor, following megatron's partition attrs."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        # SwiGLU fc1 is [gate; up] at TP=1; each TP rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=0)
    # linear_qkv rows are grouped by KV group, so contiguous chunks = whole groups per rank.
    return full.chunk(tp, dim=dim)[tp_rank]


def unshard(local: torch.Tensor, param: torch.nn.Parameter, name: str, tp: int) -> torch.Tensor:
    """Inverse of :func:`shard` via all-gather over the TP group."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        gates = [p.chunk(2, dim=0)[0] for p in parts]
        ups = [p.chunk(2, dim=0)[1] for p in parts]
        return torch.cat([torch.cat(gates, dim=dim), torch.cat(ups, dim=dim)], dim=0)
    return torch.cat(parts, dim=dim)


def load_full_weights(model, full: dict[str, torch.Tensor], tp: int, tp_rank: int, layer_offset: int) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(full[global_layer_name(name, layer_offset)], param, name, tp, tp_rank))


def summed_response_logprob(model, tokens, mask) -> torch.Tensor:
    """Direct (no schedule) forward: sum of response-token log-probs, for gradients at TP."""
    inputs, targets, target_mask = shift_for_next_token(tokens, mask)
    position_ids = torch.arange(inputs.size(1)).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, position_ids, causal_attention_mask(inputs.size(1)))
    token_logps = vocab_parallel_token_logprobs(logits, targets, vocab_size=VOCAB)
    return torch.where(target_mask, token_logps, torch.zeros_like(token_logps)).sum()


def grads_by_name(model, tp: int, layer_offset: int) -> dict[str, torch.Tensor]:
    return {
        global_layer_name(n, layer_offset): unshard(p.grad, p, n, tp) for n, p in model.named_parameters()
    }


def max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def pipeline_grads(model, tokens, mask) -> None:
    """Backward of the summed response log-probs through megatron's PP schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inputs, targets, target_mask = shift_for_next_token(tokens, mask)
    seq = inputs.size(1)
    micro = [
        {"inputs": inputs[i : i + 1], "targets": targets[i : i + 1], "mask": target_mask[i : i + 1]}
        for i in range(inputs.size(0))
    ]

    def loss_func(mb, output):
        token_logps = vocab_parallel_token_logprobs(output, mb["targets"], vocab_size=VOCAB)
        total = torch.where(mb["mask"], token_logps, torch.zeros_like(token_logps)).sum()
        # The schedule divides the loss by the number of micro-batches; undo it so the
        # gradient is that of the plain sum.
        return total * len(micro), {"sum": total.detach()}

    def forward_step(it, m):
        mb = next(it)
        pos = torch.arange(seq).unsqueeze(0)
        return m(mb["inputs"], pos, causal_attention_mask(seq)), partial(loss_func, mb)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=model,
        num_microbatches=len(micro),
        seq_length=seq,
        micro_batch_size=1,
        forward_only=False,
    )


def main(out_dir: Path) -> None:
    tokens, mask = batch()
    result: dict[str, float] = {}

    # 1. TP=1 reference (both ranks compute it; they are data-parallel replicas).
    info = init_distributed(1, 1, seed=1234)
    dist_rank = info.rank
    ref_model = build_model(1, 1)
    full = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
    ref_sums, ref_counts, ref_tok = compute_sequence_logprobs(
        ref_model, tokens, mask, micro_batch_size=MICRO, vocab_size=VOCAB, return_token_logprobs=True
    )
    with torch.no_grad():  # independent check: full-vocab log_softmax on the model's logits
        inputs, targets, target_mask = shift_for_next_token(tokens, mask)
        pos = torch.arange(inputs.size(1)).unsqueeze(0).expand_as(inputs)
        logits = ref_model.eval()(inputs, pos, causal_attention_mask(inputs.size(1)))[..., :VOCAB]
        naive = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        naive_sums = torch.where(target_mask, naive, torch.zeros_like(naive)).sum(-1)
        # megatron's own default causal mask (built on "cuda" upstream) must match ours.
        default_mask_logits = ref_model(inputs, pos, None)[..., :VOCAB]
    result["default_mask_err"] = float((default_mask_logits - logits).abs().max())
    result["ref_vs_naive_sum"] = float((ref_sums - naive_sums).abs().max())
    result["ref_counts_ok"] = float(torch.equal(ref_counts, mask.sum(-1)))
    result["ref_tok_vs_sum"] = float((ref_tok.sum(-1) - ref_sums).abs().max())
    ref_model.zero_grad()
    summed_response_logprob(ref_model, tokens, mask).backward()
    ref_grads = grads_by_name(ref_model, 1, 0)
    # Seeds are the same on every rank: the replicas must be bit-identical.
    probe = full["output_layer.weight"].clone()
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    result["replica_weight_diff"] = float((probe - full["output_layer.weight"]).abs().max())
    assert info.dp == 2
    destroy_distributed()

    # 2. TP=2.
    info = init_distributed(2, 1, seed=1234)
    model = build_model(2, 1)
    load_full_weights(model, full, 2, info.tp_rank, 0)
    result["tp2_local_vocab"] = float(model.output_layer.weight.shape[0])
    sums, counts, tok = compute_sequence_logprobs(
        model, tokens, mask, micro_batch_size=MICRO, vocab_size=VOCAB, return_token_logprobs=True
    )
    result["tp2_sum_err"] = float((sums - ref_sums).abs().max())
    result["tp2_token_err"] = float((tok - ref_tok).abs().max())
    result["tp2_counts_ok"] = float(torch.equal(counts, ref_counts))
    model.zero_grad()
    summed_response_logprob(model, tokens, mask).backward()
    result["tp2_grad_err"] = max_err(grads_by_name(model, 2, 0), ref_grads)
    destroy_distributed()

    # 3. PP=2: forward-only scores on every rank, then forward-backward through the schedule.
    info = init_distributed(1, 2, seed=1234)
    model = build_model(1, 2)
    offset = info.pp_rank * (NUM_LAYERS // 2)
    load_full_weights(model, full, 1, 0, offset)
    sums, counts, tok = compute_sequence_logprobs(
        model, tokens, mask, micro_batch_size=MICRO, vocab_size=VOCAB, return_token_logprobs=True
    )
    result["pp2_sum_err"] = float((sums - ref_sums).abs().max())
    result["pp2_token_err"] = float((tok - ref_tok).abs().max())
    result["pp2_counts_ok"] = float(torch.equal(counts, ref_counts))
    result["pp_stage_params"] = float(len(list(model.parameters())))
    model.zero_grad()
    pipeline_grads(model, tokens, mask)
    stage_grads = grads_by_name(model, 1, offset)
    result["pp2_grad_err"] = max(float((g - ref_grads[k]).abs().max()) for k, g in stage_grads.items())
    result["pp2_grad_nonzero"] = float(all(g.abs().sum() > 0 for g in stage_grads.values()))
    destroy_distributed()

    (out_dir / f"rank{dist_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
