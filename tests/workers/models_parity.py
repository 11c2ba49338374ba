"""torchrun worker: megatron vs transformers parity and export round trips, per TP/PP layout.

usage: models_parity.py ROOT --layouts 2x2,1x1,... --cases phi3,... [--save-at 2x2]
                        [--export-only saved/2x2/phi3,...]

Layouts are ``TPxPP`` with an optional ``/N`` for N layers on the first pipeline stage and
an optional ``:case+case`` restricting the cases run there; they run in the given order, all in one launch (python + megatron start-up dominates the cost of
these tiny models). Only megatron's model-parallel groups are rebuilt per layout: the
default process group cannot be re-created under torchrun.

0. rank 0 saves the tiny HF model of every case under ``hf/<case>``; all ranks import it
   into ``ckpt/<case>`` (plus models_common.EXTRA_IMPORTS).
Then for each layout and case:
1. load the HF directory directly (converted on load) at that layout;
2. per-token log-probs through the shared forward-only path (engine.forward) vs transformers;
3. gradient of the summed response log-prob through megatron's pipeline schedule, gathered
   back to HF names by the mapping, vs transformers' gradient;
4. load the imported checkpoint at that layout and export it to ``export/<layout>/<case>``;
5. at ``--save-at`` layouts, save the HF-loaded model as ``saved/<layout>/<case>``.
``--export-only`` paths (relative to ROOT) get step 4 only, into
``export/<layout>/<path with _ for />``.

Rank 0 writes the measured errors to ``ROOT/results.json``; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from models_common import (
    hf_summed_logprob_grads,
    hf_token_logprobs,
    make_batch,
    save_case,
    EXTRA_IMPORTS,
    compare_grads,
)
from nemo_infifpo.engine.distributed import init_distributed
from nemo_infifpo.engine.forward import causal_attention_mask, compute_sequence_logprobs
from nemo_infifpo.logprobs import shift_for_next_token, vocab_parallel_token_logprobs
from nemo_infifpo.models.checkpoint import VOCAB_PARAMETERS, current_shard_context, load_megatron_model, save_loaded_model
from nemo_infifpo.models.conversion import export_to_hf, import_hf_checkpoint
from nemo_infifpo.models.mapping import iter_hf_tensors
from nemo_infifpo.models.registry import weight_rules_for


def parse_layout(text: str) -> tuple[str, int, int, int | None, list[str] | None]:
    """``"1x2/1:phi3+llama"`` -> (tag "1x2f1", tp 1, pp 2, first stage 1 layer, cases)."""
    layout, _, only = text.partition(":")
    sizes, _, first = layout.partition("/")
    tp, pp = (int(x) for x in sizes.split("x"))
    return layout.replace("/", "f"), tp, pp, int(first) if first else None, only.split("+") if only else None


def relayout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def summed_logprob_backward(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    """d(sum of response log-probs)/d(weights) into ``.grad``, via megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inputs, targets, target_mask = shift_for_next_token(tokens, mask)
    seq = inputs.size(1)
    batch = {
        "inputs": inputs,
        "position_ids": torch.arange(seq).unsqueeze(0).expand(inputs.size(0), -1),
        "attention_mask": causal_attention_mask(seq),
    }

    def loss_func(output: torch.Tensor):
        logps = vocab_parallel_token_logprobs(output, targets, vocab_size=vocab_size)
        total = torch.where(target_mask, logps, torch.zeros_like(logps)).sum()
        return total, {"total": total.detach()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return model(b["inputs"], b["position_ids"], b["attention_mask"]), loss_func

    model.config.pipeline_dtype = model.config.params_dtype
    model.zero_grad(set_to_none=True)
    model.train()  # dropout is 0 in every case; train mode keeps the autograd graph
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=model,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=inputs.size(0),
        forward_only=False,
    )
    model.eval()


def sync_tied_embedding_grads(model: torch.nn.Module) -> None:
    """What megatron's finalize_model_grads does for tied embeddings with PP > 1: the first
    stage's embedding and the last stage's output layer are one HF tensor, so their gradients
    are summed across the embedding group."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1 or not model.share_embeddings_and_output_weights:
        return
    if not (model.pre_process or model.post_process):
        return  # a middle stage holds neither copy
    weight = model.shared_embedding_or_output_weight()
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def padded_rows_grad_max(model: torch.nn.Module, vocab_size: int) -> float:
    """Largest gradient on vocabulary padding rows, over all ranks (must be exactly 0)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    worst = torch.zeros(())
    for name, param in model.named_parameters():
        if name in VOCAB_PARAMETERS and param.grad is not None:
            first_padding_row = max(vocab_size - tp_rank * param.shape[0], 0)
            if first_padding_row < param.shape[0]:
                worst = torch.maximum(worst, param.grad[first_padding_row:].abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def prepare_cases(root: Path, cases: list[str]) -> None:
    """Step 0: HF models (rank 0 writes them) and their imports (collective, TP=PP=1)."""
    if dist.get_rank() == 0:
        for case in cases:
            save_case(case, root / "hf" / case)
    dist.barrier()
    relayout(1, 1)
    for case in cases:
        import_hf_checkpoint(root / "hf" / case, root / "ckpt" / case)
    for name, (case, kwargs) in EXTRA_IMPORTS.items():
        if case in cases:
            import_hf_checkpoint(root / "hf" / case, root / "ckpt" / name, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--save-at", default="")
    parser.add_argument("--export-only", default="")
    args = parser.parse_args()
    root, cases = args.root, args.cases.split(",")
    save_at = set(filter(None, args.save_at.split(",")))
    export_only = list(filter(None, args.export_only.split(",")))
    from transformers import AutoModelForCausalLM

    init_distributed(1, 1)
    rank = dist.get_rank()
    prepare_cases(root, cases)
    reference_cache: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor], int | None]] = {}
    results: dict[str, dict[str, object]] = {}
    for layout_text in args.layouts.split(","):
        tag, tp, pp, first, only = parse_layout(layout_text)
        relayout(tp, pp)
        for case in only or cases:
            hf_dir = root / "hf" / case
            loaded = load_megatron_model(hf_dir, first_stage_layers=first)
            model, vocab = loaded.model, loaded.vocab_size
            tokens, mask = make_batch(vocab)

            _, _, token_logps = compute_sequence_logprobs(
                model, tokens, mask, micro_batch_size=2, vocab_size=vocab, return_token_logprobs=True
            )
            summed_logprob_backward(model, tokens, mask, vocab)
            sync_tied_embedding_grads(model)
            ctx = current_shard_context(loaded.arch, loaded.padded_vocab_size)
            grads = dict(iter_hf_tensors(model, weight_rules_for(loaded.arch), ctx, tensor_of=lambda p: p.grad))
            padded_grad = padded_rows_grad_max(model, vocab)

            if rank == 0:
                if case not in reference_cache:
                    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
                    with torch.no_grad():
                        reference_logps = hf_token_logprobs(hf, tokens, mask)
                    reference_grads = hf_summed_logprob_grads(hf, tokens, mask)
                    reference_cache[case] = (reference_logps, reference_grads, hf.model.embed_tokens.padding_idx)
                reference, reference_grads, padding_idx = reference_cache[case]
                grad_errors = compare_grads(grads, reference_grads, padding_idx=padding_idx)
                worst = max(grad_errors, key=grad_errors.get)
                results[f"{case}@{tag}"] = {
                    "logprob_max_abs_err": float((token_logps - reference).abs().max()),
                    "grad_max_rel_err": grad_errors[worst],
                    "grad_worst_tensor": worst,
                    "grad_names_match": sorted(grads) == sorted(reference_grads),
                    "padded_vocab_size": loaded.padded_vocab_size,
                    "padded_row_grad_max": padded_grad,
                }
            if tag in save_at:
                save_loaded_model(loaded, root / "saved" / tag / case)
            del loaded, model

            imported = load_megatron_model(root / "ckpt" / case, first_stage_layers=first)
            export_to_hf(imported, root / "export" / tag / case, max_shard_size="64KB")
            del imported
        for relative in export_only:
            name = relative.replace("/", "_")
            imported = load_megatron_model(root / relative, first_stage_layers=first)
            if rank == 0:
                results[f"{name}@{tag}"] = {"padded_vocab_size": imported.padded_vocab_size}
            export_to_hf(imported, root / "export" / tag / name, max_shard_size="64KB")
            del imported
    if rank == 0:
        (root / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
