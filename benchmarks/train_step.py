"""Throughput of one InfiFPO training step on one GPU, against a plain transformers DPO step.

    python benchmarks/train_step.py --layers 4 --seq-len 2048 --output bench.json

Both sides use a Phi-4-shaped decoder (hidden 5120, 40 heads / 10 KV heads, SwiGLU 17920,
vocab 100352) with ``--layers`` layers and random weights in bf16, the same synthetic pairs
(chosen and rejected of ``--seq-len`` tokens, a quarter of it prompt) and the same number of
pairs per step:

* ``infifpo``: this package's training step (``nemo_infifpo.training.loop.train_step``):
  megatron-core GPTModel (Transformer Engine layer spec when importable), vocab-parallel
  log-probs, ``infifpo_loss`` against precomputed scores, megatron DDP + optimizer
  (fp32 main weights, Adam);
* ``hf_dpo``: ``transformers`` Phi3ForCausalLM (SDPA attention, fp32 weights under bf16
  autocast as HF Trainer/TRL run ``bf16=True``) + fused ``torch.optim.AdamW``, the DPO sigmoid
  loss on precomputed reference log-probs, written with plain torch.

Reports tokens/s (real tokens of both responses and prompts), step time and MFU (model FLOPs
over the GPU's dense bf16 peak) for each, and their ratio, as JSON on stdout (and
``--output``). Needs one CUDA GPU (about 5 minutes on an H100 with the defaults); without
CUDA it exits at once with an error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PHI4 = dict(
    hidden_size=5120,
    intermediate_size=17920,
    num_attention_heads=40,
    num_key_value_heads=10,
    vocab_size=100352,
    max_position_embeddings=16384,
    rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Phi-4-shaped model")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (prompt + response)")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-pairs", type=int, default=1, help="pairs per micro-batch (infifpo)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args(argv)


def hf_config(layers: int) -> Any:
    from transformers import Phi3Config

    config = Phi3Config(num_hidden_layers=layers, **PHI4)
    config.architectures = ["Phi3ForCausalLM"]
    return config


def synthetic_pairs(args: argparse.Namespace, vocab: int) -> list[Any]:
    import torch

    from nemo_infifpo.data.templates import TokenizedPair, TokenizedSequence

    generator = torch.Generator().manual_seed(0)
    prompt = args.seq_len // 4
    pairs = []
    for i in range(args.pairs_per_step):
        shared = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        sides = [shared + torch.randint(0, vocab, (args.seq_len - prompt,), generator=generator).tolist() for _ in range(2)]
        pairs.append(TokenizedPair(str(i), TokenizedSequence(sides[0], prompt), TokenizedSequence(sides[1], prompt)))
    return pairs


def timed(step: Any, args: argparse.Namespace) -> list[float]:
    import torch

    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    mean = sum(times) / len(times)
    return {
        "step_time_s": mean,
        "step_times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / mean,
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / mean / peak if peak else None,
        "peak_memory_gib": __import__("torch").cuda.max_memory_allocated() / 2**30,
    }


def bench_infifpo(args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_infifpo.engine.distributed import init_distributed
    from nemo_infifpo.models.checkpoint import LoadedModel
    from nemo_infifpo.models.megatron_model import build_gpt_model, transformer_engine_available
    from nemo_infifpo.models.parallel import ParallelLayout, padded_vocab_size
    from nemo_infifpo.models.registry import describe_hf_config
    from nemo_infifpo.training.batches import pad_micro_batches
    from nemo_infifpo.training.config import parse_config
    from nemo_infifpo.training.loop import train_step
    from nemo_infifpo.training.metrics import training_flops
    from nemo_infifpo.training.model import MegatronInfiFPOModel, training_config_overrides
    from nemo_infifpo.training.objective import Objective
    from nemo_infifpo.training.optimizer import build_optimizer
    from omegaconf import OmegaConf

    config = parse_config({
        "model": {"path": "<random>", "precision": "bf16", "micro_batch_size": args.micro_batch_pairs,
                  "global_batch_size": args.pairs_per_step, "recompute": args.recompute, "use_distributed_optimizer": False},
        "data": {"path": "<synthetic>", "max_length": args.seq_len},
        "output_dir": "<none>",
        "optim": {"lr": 1e-7},
    })
    info = init_distributed(1, 1)
    hf = hf_config(args.layers)
    arch = describe_hf_config(hf)
    layout = ParallelLayout(1, 1)
    padded = padded_vocab_size(arch.vocab_size, 1)
    te = transformer_engine_available()
    module = build_gpt_model(
        arch, layout, padded_vocab_size=padded, params_dtype=torch.bfloat16, device=info.device,
        use_transformer_engine=te,
        config_overrides={**training_config_overrides(config), "perform_initialization": True},
    )
    loaded = LoadedModel(module, arch, hf, layout, padded, Path("."), Path("."))
    model = MegatronInfiFPOModel(OmegaConf.create({"pivot": {"path": "<random>"}}), loaded, Objective(config.loss, ("s0", "s1")))
    optimizer = build_optimizer(module, config, info.device)

    pairs = synthetic_pairs(args, arch.vocab_size)
    g = torch.Generator().manual_seed(1)
    n = len(pairs)
    scores = {
        "ref_chosen": -torch.rand(n, generator=g, dtype=torch.float64) - 1,
        "ref_rejected": -torch.rand(n, generator=g, dtype=torch.float64) - 1,
        "source_chosen": -torch.rand(n, 2, generator=g, dtype=torch.float64) - 1,
        "source_rejected": -torch.rand(n, 2, generator=g, dtype=torch.float64) - 1,
    }
    micro = pad_micro_batches(pairs, list(range(n)), scores, micro_batch_size=args.micro_batch_pairs,
                              seq_length=args.seq_len, explicit_mask=not te)
    forward_backward = get_forward_backward_func()
    torch.cuda.reset_peak_memory_stats()
    times = timed(lambda: train_step(model, optimizer, micro, 1e-7, forward_backward), args)
    flops = training_flops(arch, [args.seq_len] * (2 * n), padded)
    result = summary(times, 2 * n * args.seq_len, flops, peak)
    result.update(transformer_engine=te, recompute=args.recompute)
    del model, optimizer, module, loaded, micro
    gc.collect()
    torch.cuda.empty_cache()
    return result


def bench_hf_dpo(args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.models.registry import describe_hf_config
    from nemo_infifpo.training.metrics import training_flops

    config = hf_config(args.layers)
    # As HF Trainer / TRL run bf16: fp32 weights and optimizer state, bf16 autocast compute.
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    pairs = synthetic_pairs(args, config.vocab_size)
    batch = [(torch.tensor([p.chosen.input_ids, p.rejected.input_ids]).cuda(), p.chosen.response_start) for p in pairs]
    ref = torch.full((2,), -1.5, device="cuda")
    beta = 0.1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for ids, start in batch:  # one pair (chosen + rejected) per forward, like micro-batch 1
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids).logits[:, :-1].float()
            logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[:, start - 1 :].sum(-1)
            margin = (logps[0] - ref[0]) - (logps[1] - ref[1])
            (-F.logsigmoid(beta * margin) / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    times = timed(step, args)
    flops = training_flops(describe_hf_config(config), [args.seq_len] * (2 * len(pairs)))
    result = summary(times, 2 * len(pairs) * args.seq_len, flops, peak)
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "benchmarks/train_step.py needs a CUDA GPU (one H100); none is available"}), file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nemo_infifpo.training.metrics import peak_flops_per_second

    device = torch.device("cuda", 0)
    peak = peak_flops_per_second(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "peak_bf16_flops": peak,
        "shape": {"layers": args.layers, "seq_len": args.seq_len, "pairs_per_step": args.pairs_per_step,
                  "micro_batch_pairs": args.micro_batch_pairs, **{k: v for k, v in PHI4.items() if isinstance(v, int)}},
        "infifpo": bench_infifpo(args, peak),
        "hf_dpo": bench_hf_dpo(args, peak),
    }
    result["speedup_tokens_per_s"] = result["infifpo"]["tokens_per_s"] / result["hf_dpo"]["tokens_per_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
