"""One GPU, one command: does the recipe's CUDA path work, and how fast is its training step?

    python benchmarks/gpu_check.py              # one NVIDIA GPU (H100/H200), about 5 minutes
    python benchmarks/gpu_check.py --cpu-smoke  # everything a CPU can run, tiny shapes (tests)

Prints one JSON object: ``checks`` (name -> pass/fail), the numbers behind each, ``passed``;
exit status 1 if a check fails, 2 if the machine cannot run it. The checks:

* ``parity``: per-token log-probs of a Phi-4-shaped model (hidden 5120, 40 heads / 10 KV
  heads, SwiGLU 17920, vocab 100352; ``--layers`` layers, random weights) through megatron
  with the Transformer Engine spec and the local spec against transformers, in float32
  (tight) and bfloat16 (judged against transformers' own bf16 error).
* ``pipeline``: a pivot written as an HF checkpoint is scored (megatron back end, padded
  batches), merged, and trained for 3 steps through ``nemo_infifpo.training.loop.train`` with
  packed sequences (THD with Transformer Engine), megatron DDP with the distributed optimizer
  and overlapped gradient reduce / parameter gather, in the scoring dtype. Step-0 parity runs
  the training forward, so it compares the training path (packing) with the scoring path.
  Sequence parallelism needs TP > 1 and is not run on one GPU.
* ``resume``: the same run interrupted by SIGUSR1 after step 3 (checkpoint), resumed to step
  4: its step-4 loss must equal the uninterrupted run's.
* ``export``: the final checkpoint exported to HF loads with ``AutoModelForCausalLM`` and its
  log-probs match megatron's.
* ``throughput`` (GPU only): tokens/s and MFU of the InfiFPO training step at Phi-4 shape
  against a plain transformers DPO step (bf16 autocast, fused AdamW).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHI4_SHAPE = dict(
    vocab_size=100352,
    hidden_size=5120,
    intermediate_size=17920,
    num_attention_heads=40,
    num_key_value_heads=10,
    max_position_embeddings=16384,
    rope_parameters={"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 1.0},
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# The pipeline check's pivot: small enough to write, score and train in seconds, shaped so
# that every Transformer Engine kernel (fused attention with THD, fused norms) takes it.
PIPELINE_SHAPE_GPU = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)

# float32 on GPU: different GEMM/attention kernels and reduction orders only; a mapping bug is O(1).
FP32_MAX_ABS = 2e-2
# bf16: megatron may be at most this many times further from the float32 reference than
# transformers' own bf16 run is (plus a small absolute slack for near-zero baselines).
BF16_NOISE_RATIO = 2.0
BF16_SLACK = 0.05
# Step-0 parity per token between scoring and the training path (fp32 / bf16 means).
PARITY_ATOL = {"fp32": 1e-4, "bf16": 2e-2}
EXPORT_MAX_ABS = {"fp32": 1e-4, "bf16": 5e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, local spec, fp32")
    parser.add_argument("--layers", type=int, default=2, help="layers of the Phi-4-shaped parity model")
    parser.add_argument("--parity-seq", type=int, default=512)
    parser.add_argument("--bench-layers", type=int, default=4, help="layers of the Phi-4-shaped throughput model")
    parser.add_argument("--bench-seq", type=int, default=2048, help="tokens per sequence in the throughput check")
    parser.add_argument("--bench-pairs", type=int, default=4, help="pairs per optimizer step in the throughput check")
    parser.add_argument("--bench-steps", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the pipeline check writes (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(cpu_smoke: bool) -> dict[str, Any]:
    import torch

    if cpu_smoke:
        os.environ["NEMO_INFIFPO_FORCE_CPU"] = "1"
        return {"device": "cpu (smoke)", "torch": torch.__version__, "transformer_engine": None}
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: gpu_check.py needs one NVIDIA GPU (--cpu-smoke runs the rest on CPU)"}))
        raise SystemExit(2)
    try:
        import transformer_engine
    except Exception as error:  # ImportError, or a broken CUDA build raising at import
        print(json.dumps({"error": f"transformer_engine is not importable ({error}); install the 'gpu' extra"}))
        raise SystemExit(2)
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformer_engine": getattr(transformer_engine, "__version__", "unknown"),
    }


# --------------------------------------------------------------------------- parity


def _errors(actual: Any, expected: Any) -> dict[str, float]:
    diff = (actual[:, 1:].double() - expected[:, 1:].double()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def _hf_token_logprobs(model: Any, tokens: Any) -> Any:
    """[B, S] float32 log p(token t | < t); column 0 is 0 (never scored)."""
    import torch

    with torch.no_grad():
        rows = []
        for row in tokens:  # one sequence at a time keeps [S, V] float32 logits small
            logits = model(row.unsqueeze(0)).logits[0, :-1].float()
            rows.append(logits.log_softmax(-1).gather(-1, row[1:, None]).squeeze(-1))
        return torch.cat([torch.zeros(tokens.size(0), 1, device=tokens.device), torch.stack(rows)], dim=1)


def _megatron_token_logprobs(hf_state: dict, arch: Any, dtype: Any, device: Any, use_te: bool, tokens: Any) -> Any:
    import torch

    from nemo_infifpo.engine.forward import compute_sequence_logprobs
    from nemo_infifpo.models.checkpoint import current_shard_context
    from nemo_infifpo.models.mapping import StateDictSource, load_hf_weights
    from nemo_infifpo.models.megatron_model import build_gpt_model
    from nemo_infifpo.models.parallel import ParallelLayout, padded_vocab_size
    from nemo_infifpo.models.registry import weight_rules_for

    padded = padded_vocab_size(arch.vocab_size, 1)
    model = build_gpt_model(arch, ParallelLayout(), padded_vocab_size=padded, params_dtype=dtype, device=device,
                            use_transformer_engine=use_te)
    load_hf_weights(model, weight_rules_for(arch), StateDictSource(hf_state), current_shard_context(arch, padded))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    _, _, logps = compute_sequence_logprobs(model.eval(), tokens, mask, micro_batch_size=2, vocab_size=arch.vocab_size,
                                            return_token_logprobs=True)
    del model
    release_memory()
    return logps.to(tokens.device)


def check_parity(args: argparse.Namespace, device: Any) -> tuple[dict[str, Any], dict[str, bool]]:
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.models.registry import describe_hf_config
    from nemo_infifpo.testing.models import randomize_, tiny_hf_config

    config = tiny_hf_config("phi3", num_hidden_layers=args.layers, **({} if args.cpu_smoke else PHI4_SHAPE))
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    hf = randomize_(hf, args.seed).eval()
    arch = describe_hf_config(hf.config)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    seq = 32 if args.cpu_smoke else args.parity_seq
    tokens = torch.randint(0, arch.vocab_size, (4, seq), generator=torch.Generator().manual_seed(args.seed)).to(device)
    specs = {"local": False} if args.cpu_smoke else {"te": True, "local": False}

    out: dict[str, Any] = {"layers": args.layers, "seq": seq, "float32": {}, "bfloat16": {}}
    reference = _hf_token_logprobs(hf, tokens)
    fp32 = {name: _megatron_token_logprobs(state, arch, torch.float32, device, te, tokens) for name, te in specs.items()}
    for name, logps in fp32.items():
        out["float32"][f"{name}_vs_hf"] = _errors(logps, reference)
    checks = {f"parity_fp32_{n}_vs_hf": out["float32"][f"{n}_vs_hf"]["max_abs"] <= FP32_MAX_ABS for n in specs}
    if "te" in fp32:
        out["float32"]["te_vs_local"] = _errors(fp32["te"], fp32["local"])
        checks["parity_fp32_te_vs_local"] = out["float32"]["te_vs_local"]["max_abs"] <= FP32_MAX_ABS
    if not args.cpu_smoke:
        hf = hf.to(torch.bfloat16)
        reference_bf16 = _hf_token_logprobs(hf, tokens)
        del hf
        release_memory()
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        baseline = _errors(reference_bf16, reference)["max_abs"]
        out["bfloat16"]["hf_bf16_vs_hf_fp32"] = baseline
        for name, te in specs.items():
            logps = _megatron_token_logprobs(state, arch, torch.bfloat16, device, te, tokens)
            out["bfloat16"][f"{name}_vs_hf_fp32"] = _errors(logps, reference)
            checks[f"parity_bf16_{name}_within_hf_bf16_noise"] = (
                out["bfloat16"][f"{name}_vs_hf_fp32"]["max_abs"] <= BF16_NOISE_RATIO * baseline + BF16_SLACK
            )
    release_memory()
    return out, checks


# --------------------------------------------------------------------------- pipeline, resume, export


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone light cloud green seven paper quiet north music".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    return [{"id": f"r{i:03d}", "prompt": text(rng.randint(4, 12)), "chosen": text(rng.randint(3, 16)),
             "rejected": text(rng.randint(3, 16))} for i in range(n)]


def _train_config(work: Path, out: str, precision: str, **sections: Any) -> Any:
    from nemo_infifpo.training.config import parse_config

    raw: dict[str, Any] = {
        "seed": 7,
        "output_dir": str(work / out),
        "model": {"path": str(work / "pivot"), "precision": precision, "micro_batch_size": 2, "global_batch_size": 8,
                  "use_distributed_optimizer": True},
        "data": {"path": str(work / "train.scored.parquet"), "max_length": 120, "pack_sequences": True, "shuffle": True},
        "loss": {"type": "infifpo", "beta": 2.5},
        "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_fraction": 0.0},
        "trainer": {"max_steps": 4, "step0_parity_atol": PARITY_ATOL[precision]},
        "checkpoint": {"interval": 0, "save_final": True},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw)


def _losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def check_pipeline(args: argparse.Namespace, device: Any, work: Path) -> tuple[dict[str, Any], dict[str, bool]]:
    import torch

    from nemo_infifpo.engine.distributed import destroy_distributed
    from nemo_infifpo.scoring.backends import shutdown_distributed
    from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
    from nemo_infifpo.scoring.merge import merge_scores
    from nemo_infifpo.testing.models import save_tiny_hf_model
    from nemo_infifpo.training.loop import train

    precision = "fp32" if args.cpu_smoke else "bf16"
    shape = {} if args.cpu_smoke else PIPELINE_SHAPE_GPU
    save_tiny_hf_model("phi3", work / "pivot", seed=args.seed, **shape)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows(24, args.seed)))
    out: dict[str, Any] = {"precision": precision}

    started = time.perf_counter()
    run_scoring(ScoreConfig.from_mapping({
        "model": {"path": str(work / "pivot"), "backend": "megatron"}, "data": {"path": str(data), "max_length": 120},
        "output_dir": str(work / "scores" / "pivot"), "dtype": "float32" if precision == "fp32" else "bfloat16",
        "progress": False,
    }))
    shutdown_distributed()
    merge_scores(data, work / "scores" / "pivot", [], work / "train.scored.parquet")
    out["score_and_merge_s"] = round(time.perf_counter() - started, 1)

    # Straight: 4 steps. The parity check at step 0 is the training path (packing/THD).
    started = time.perf_counter()
    straight = train(_train_config(work, "straight", precision))
    out["train_s"] = round(time.perf_counter() - started, 1)
    out["uses_transformer_engine"] = bool(straight.model.uses_transformer_engine)
    out["step0_parity_max_abs_diff"] = straight.parity_max_abs_diff
    records = [json.loads(line) for line in (work / "straight" / "metrics.jsonl").read_text().splitlines()]
    out["losses"] = [r["loss"] for r in records]
    out["grad_norms"] = [r["grad_norm"] for r in records]
    del straight
    destroy_distributed()
    release_memory()

    # Interrupted after step 3 (SIGUSR1: checkpoint, return), then resumed to step 4.
    def stop_after_3(ctx: Any) -> None:
        if ctx.step == 3:
            signal.raise_signal(signal.SIGUSR1)

    first = train(_train_config(work, "resumed", precision), callbacks=[stop_after_3])
    out["interrupted_at"] = first.step
    del first
    destroy_distributed()
    second = train(_train_config(work, "resumed", precision))
    resumed_losses = _losses(work / "resumed")
    checkpoint = second.checkpoint
    del second
    destroy_distributed()
    release_memory()
    out["resumed_losses"] = resumed_losses
    step4 = abs(resumed_losses[-1] - out["losses"][-1]) if len(resumed_losses) == 4 else math.inf
    out["resume_step4_loss_abs_diff"] = step4

    # Export, then the same log-probs from transformers and from megatron.
    export_out = check_export(checkpoint, work / "hf", precision, device, args.seed)
    checks = {
        "pipeline_step0_parity_training_path": out["step0_parity_max_abs_diff"] is not None,
        "pipeline_three_plus_steps_finite": len(out["losses"]) == 4 and all(map(math.isfinite, out["losses"])),
        "pipeline_loss_decreases": out["losses"][-1] < out["losses"][0],
        "resume_interrupted_at_step_3": out["interrupted_at"] == 3,
        "resume_same_step4_loss": step4 <= (1e-6 if precision == "fp32" else 1e-3) * max(1.0, abs(out["losses"][-1])),
        "export_loads_and_matches": export_out["max_abs"] <= EXPORT_MAX_ABS[precision],
    }
    if not args.cpu_smoke:
        checks["pipeline_uses_transformer_engine"] = out["uses_transformer_engine"]
    out["export"] = export_out
    out["sequence_parallel"] = "not run: needs tensor_model_parallel_size > 1 (one GPU)"
    del torch
    return out, checks


def check_export(checkpoint: Path, hf_dir: Path, precision: str, device: Any, seed: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.engine.forward import compute_sequence_logprobs
    from nemo_infifpo.models.checkpoint import load_megatron_model
    from nemo_infifpo.models.conversion import export_checkpoint_to_hf

    info = init_distributed(1, 1)
    export_checkpoint_to_hf(checkpoint, hf_dir, device=info.device)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    loaded = load_megatron_model(checkpoint, params_dtype=dtype, device=info.device, use_transformer_engine=False)
    vocab = int(loaded.vocab_size)
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed + 3)).to(info.device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    _, _, megatron = compute_sequence_logprobs(loaded.model.eval(), tokens, mask, micro_batch_size=2, vocab_size=vocab,
                                               return_token_logprobs=True)
    del loaded
    destroy_distributed()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(info.device).eval()
    reference = _hf_token_logprobs(hf, tokens)
    del hf
    release_memory()
    return {"checkpoint": str(checkpoint), **_errors(megatron.to(reference.device), reference)}


# --------------------------------------------------------------------------- throughput (GPU)


def _synthetic_pairs(n: int, seq: int, vocab: int) -> list[Any]:
    import torch

    from nemo_infifpo.data.templates import TokenizedPair, TokenizedSequence

    generator = torch.Generator().manual_seed(0)
    prompt = seq // 4
    pairs = []
    for i in range(n):
        shared = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        sides = [shared + torch.randint(0, vocab, (seq - prompt,), generator=generator).tolist() for _ in range(2)]
        pairs.append(TokenizedPair(str(i), TokenizedSequence(sides[0], prompt), TokenizedSequence(sides[1], prompt)))
    return pairs


def _timed(step: Any, steps: int, warmup: int = 1) -> list[float]:
    import torch

    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float], tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    import torch

    mean = sum(times) / len(times)
    return {"step_time_s": mean, "tokens_per_s": tokens / mean, "mfu": flops / mean / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_infifpo(args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    """The package's training step (train_step: megatron GPTModel, TE spec, vocab-parallel
    log-probs, InfiFPO loss, megatron DDP + distributed optimizer) on synthetic pairs."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from omegaconf import OmegaConf

    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.models.checkpoint import LoadedModel
    from nemo_infifpo.models.megatron_model import build_gpt_model, transformer_engine_available
    from nemo_infifpo.models.parallel import ParallelLayout, padded_vocab_size
    from nemo_infifpo.models.registry import describe_hf_config
    from nemo_infifpo.testing.models import tiny_hf_config
    from nemo_infifpo.engine.batches import pack_micro_batches
    from nemo_infifpo.training.config import parse_config
    from nemo_infifpo.training.loop import train_step
    from nemo_infifpo.training.metrics import training_flops
    from nemo_infifpo.training.model import MegatronInfiFPOModel, training_config_overrides
    from nemo_infifpo.training.objective import Objective
    from nemo_infifpo.training.optimizer import build_optimizer

    config = parse_config({
        "model": {"path": "<random>", "precision": "bf16", "micro_batch_size": 1, "global_batch_size": args.bench_pairs},
        "data": {"path": "<synthetic>", "max_length": args.bench_seq, "pack_sequences": True},
        "output_dir": "<none>", "optim": {"lr": 1e-7},
    })
    info = init_distributed(1, 1)
    hf = tiny_hf_config("phi3", num_hidden_layers=args.bench_layers, **PHI4_SHAPE)
    arch = describe_hf_config(hf)
    padded = padded_vocab_size(arch.vocab_size, 1)
    te = transformer_engine_available()
    module = build_gpt_model(arch, ParallelLayout(1, 1), padded_vocab_size=padded, params_dtype=torch.bfloat16,
                             device=info.device, use_transformer_engine=te,
                             config_overrides={**training_config_overrides(config), "perform_initialization": True})
    loaded = LoadedModel(module, arch, hf, ParallelLayout(1, 1), padded, Path("."), Path("."))
    model = MegatronInfiFPOModel(OmegaConf.create({"pivot": {"path": "<random>"}}), loaded, Objective(config.loss, ("s0", "s1")))
    optimizer = build_optimizer(module, config, info.device)
    pairs = _synthetic_pairs(args.bench_pairs, args.bench_seq, arch.vocab_size)
    g = torch.Generator().manual_seed(1)
    n = len(pairs)
    scores = {"ref_chosen": -torch.rand(n, generator=g, dtype=torch.float64) - 1,
              "ref_rejected": -torch.rand(n, generator=g, dtype=torch.float64) - 1,
              "source_chosen": -torch.rand(n, 2, generator=g, dtype=torch.float64) - 1,
              "source_rejected": -torch.rand(n, 2, generator=g, dtype=torch.float64) - 1}
    micro = pack_micro_batches(pairs, list(range(n)), scores, bin_length=2 * args.bench_seq, use_transformer_engine=te)
    forward_backward = get_forward_backward_func()
    torch.cuda.reset_peak_memory_stats()
    times = _timed(lambda: train_step(model, optimizer, micro, 1e-7, forward_backward), args.bench_steps)
    result = _summary(times, 2 * n * args.bench_seq, training_flops(arch, [args.bench_seq] * (2 * n), padded), peak)
    result.update(transformer_engine=te, packed=True)
    destroy_distributed()
    return result


def bench_hf_dpo(args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    """transformers Phi3ForCausalLM (SDPA, fp32 weights under bf16 autocast as TRL runs
    bf16=True) + fused AdamW + the DPO sigmoid loss, one pair per forward."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.models.registry import describe_hf_config
    from nemo_infifpo.testing.models import tiny_hf_config
    from nemo_infifpo.training.metrics import training_flops

    config = tiny_hf_config("phi3", num_hidden_layers=args.bench_layers, **PHI4_SHAPE)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    pairs = _synthetic_pairs(args.bench_pairs, args.bench_seq, config.vocab_size)
    batch = [(torch.tensor([p.chosen.input_ids, p.rejected.input_ids]).cuda(), p.chosen.response_start) for p in pairs]
    ref = torch.full((2,), -1.5, device="cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for ids, start in batch:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids).logits[:, :-1].float()
            logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[:, start - 1 :].sum(-1)
            margin = (logps[0] - ref[0]) - (logps[1] - ref[1])
            (-F.logsigmoid(0.1 * margin) / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    times = _timed(step, args.bench_steps)
    flops = training_flops(describe_hf_config(config), [args.bench_seq] * (2 * len(pairs)))
    return _summary(times, 2 * len(pairs) * args.bench_seq, flops, peak)


def check_throughput(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, bool]]:
    import torch

    from nemo_infifpo.training.metrics import peak_flops_per_second

    peak = peak_flops_per_second(torch.device("cuda", 0))
    out: dict[str, Any] = {"layers": args.bench_layers, "seq": args.bench_seq, "pairs_per_step": args.bench_pairs,
                           "peak_bf16_flops": peak}
    out["infifpo"] = bench_infifpo(args, peak)
    release_memory()  # the first model is gone with its function's frame
    out["hf_dpo"] = bench_hf_dpo(args, peak)
    release_memory()
    out["speedup_tokens_per_s"] = out["infifpo"]["tokens_per_s"] / out["hf_dpo"]["tokens_per_s"]
    return out, {"throughput_not_slower_than_hf_dpo": out["speedup_tokens_per_s"] >= 1.0}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "environment": environment(args.cpu_smoke)}
    import torch

    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed

    checks: dict[str, bool] = {}
    info = init_distributed(1, 1, device="cpu" if args.cpu_smoke else None)
    result["parity"], found = check_parity(args, info.device)
    checks.update(found)
    destroy_distributed()

    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result["pipeline"], found = check_pipeline(args, info.device, work)
        checks.update(found)
    if not args.cpu_smoke:
        result["throughput"], found = check_throughput(args)
        checks.update(found)
    result["checks"] = checks
    result["passed"] = all(checks.values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    del torch
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["passed"] else 1


if __name__ == "__main__":  # checkpoint saving re-imports __main__ in a helper process
    raise SystemExit(main())
