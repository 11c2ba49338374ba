"""GPU parity and log-prob throughput: megatron (Transformer Engine and local specs) vs HF.

For ONE NVIDIA GPU (H100: about 2.5 min, < 30 GB). Builds a Phi-4-shaped model (hidden 5120,
40 heads over 10 KV heads, FFN 17920, vocab 100352, untied) with a few layers and random
weights directly on the GPU, then loads the very same weights into megatron through the
project's weight mapping and compares per-token log-probs:

* float32: TE spec vs transformers, local spec vs transformers, TE vs local (tight: the same
  math, only kernel order differs);
* bfloat16: TE / local spec vs transformers bf16, judged against transformers' own bf16 error
  relative to its float32 result (bf16 cannot be compared bit-for-bit across kernels);
* throughput: forward-only log-probs (the scoring path, engine.forward) in tokens/s for both
  specs in bf16.

Prints one JSON object (``checks`` holds pass/fail booleans; exit code 1 if one fails).

    python benchmarks/gpu_parity.py                  # Phi-4 shape, 4 layers
    python benchmarks/gpu_parity.py --layers 2 --seq 2048
    python benchmarks/gpu_parity.py --smoke-cpu      # tiny shape on CPU, local spec only:
                                                     # checks this script, not the GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
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
)

# float32 on GPU: different GEMM/attention kernels and reduction orders only. 4 layers of
# width 5120 keep the per-token log-prob error around 1e-4..1e-3; a mapping bug is O(1).
FP32_MAX_ABS = 2e-2
# bf16: megatron may be at most this many times further from the float32 reference than
# transformers' own bf16 run is (plus a small absolute slack for near-zero baselines).
BF16_NOISE_RATIO = 2.0
BF16_SLACK = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences for the parity checks")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument("--throughput-seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny shape on CPU, local spec only")
    return parser.parse_args()


def fail_fast(message: str) -> None:
    print(json.dumps({"error": message}))
    raise SystemExit(2)


def check_environment(smoke_cpu: bool) -> dict[str, Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        fail_fast("torch is not installed")
    if smoke_cpu:
        return {"device": "cpu (smoke test)", "torch": torch.__version__, "transformer_engine": None}
    if not torch.cuda.is_available():
        fail_fast("no CUDA device: gpu_parity.py needs one NVIDIA GPU (use --smoke-cpu to test the script on CPU)")
    try:
        import transformer_engine
    except Exception as error:  # ImportError or a broken CUDA build
        fail_fast(f"transformer_engine is not importable ({error}); install the project's 'gpu' extra")
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformer_engine": getattr(transformer_engine, "__version__", "unknown"),
    }


def build_hf_model(args: argparse.Namespace, device: Any) -> Any:
    """Phi-4-shaped (or tiny, for --smoke-cpu) HF model, random float32 weights on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.testing.models import randomize_, tiny_hf_config

    shape = {} if args.smoke_cpu else PHI4_SHAPE
    config = tiny_hf_config("phi3", num_hidden_layers=args.layers, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return randomize_(model, args.seed).eval()


def hf_token_logprobs(model: Any, tokens: Any) -> Any:
    """[B, S] float32 log p(token t | < t); column 0 is 0 (never scored)."""
    import torch

    with torch.no_grad():
        rows = []
        for row in tokens:  # one sequence at a time: [S, V] float32 logits stay small
            logits = model(row.unsqueeze(0)).logits[0, :-1].float()
            rows.append(logits.log_softmax(-1).gather(-1, row[1:, None]).squeeze(-1))
        return torch.cat([torch.zeros(tokens.size(0), 1, device=tokens.device), torch.stack(rows)], dim=1)


def build_megatron_model(hf_state: dict, arch: Any, dtype: Any, device: Any, use_te: bool) -> tuple[Any, int]:
    from nemo_infifpo.models.checkpoint import current_shard_context
    from nemo_infifpo.models.mapping import StateDictSource, load_hf_weights
    from nemo_infifpo.models.megatron_model import build_gpt_model
    from nemo_infifpo.models.parallel import ParallelLayout, padded_vocab_size
    from nemo_infifpo.models.registry import weight_rules_for

    padded = padded_vocab_size(arch.vocab_size, 1)
    model = build_gpt_model(
        arch, ParallelLayout(), padded_vocab_size=padded, params_dtype=dtype, device=device, use_transformer_engine=use_te
    )
    load_hf_weights(model, weight_rules_for(arch), StateDictSource(hf_state), current_shard_context(arch, padded))
    return model.eval(), padded


def megatron_token_logprobs(model: Any, tokens: Any, vocab_size: int, micro_batch: int) -> Any:
    import torch

    from nemo_infifpo.engine.forward import compute_sequence_logprobs

    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    _, _, token_logps = compute_sequence_logprobs(
        model, tokens, mask, micro_batch_size=micro_batch, vocab_size=vocab_size, return_token_logprobs=True
    )
    return token_logps.to(tokens.device)


def errors(actual: Any, expected: Any) -> dict[str, float]:
    diff = (actual[:, 1:].double() - expected[:, 1:].double()).abs()
    seq_diff = (actual.double().sum(1) - expected.double().sum(1)).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "seq_sum_max_abs": float(seq_diff.max())}


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Return freed GPU memory to the allocator pool (call after ``del`` of a model)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput(model: Any, vocab_size: int, args: argparse.Namespace, device: Any) -> float:
    import torch

    from nemo_infifpo.engine.forward import compute_sequence_logprobs

    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    tokens = torch.randint(0, vocab_size, (args.throughput_batch, args.throughput_seq), generator=generator).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False

    def run_once() -> None:
        compute_sequence_logprobs(model, tokens, mask, micro_batch_size=args.micro_batch, vocab_size=vocab_size)

    run_once()  # warm-up: kernels, allocator, RoPE cache
    synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        run_once()
    synchronize()
    return tokens.numel() * args.iters / (time.perf_counter() - start)


def main() -> int:
    args = parse_args()
    if args.smoke_cpu:
        args.batch, args.seq, args.throughput_batch, args.throughput_seq = 2, 32, 4, 64
    environment = check_environment(args.smoke_cpu)
    started = time.perf_counter()

    import torch

    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.models.registry import describe_hf_config

    info = init_distributed(1, 1, device="cpu" if args.smoke_cpu else None)
    device = info.device
    specs = {"local": False} if args.smoke_cpu else {"te": True, "local": False}

    hf = build_hf_model(args, device)
    arch = describe_hf_config(hf.config)
    hf_state = {name: tensor.detach() for name, tensor in hf.state_dict().items()}
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq), generator=generator).to(device)

    result: dict[str, Any] = {"environment": environment}
    result["model"] = {
        "shape": "tiny phi3 (smoke)" if args.smoke_cpu else "Phi-4 (Phi3ForCausalLM)",
        "layers": arch.num_layers,
        "hidden": arch.hidden_size,
        "heads": arch.num_attention_heads,
        "kv_heads": arch.num_query_groups,
        "ffn": arch.ffn_hidden_size,
        "vocab": arch.vocab_size,
        "parameters_billion": round(sum(t.numel() for t in hf_state.values()) / 1e9, 3),
    }

    # --- float32: tight parity of both specs with transformers and with each other.
    reference_fp32 = hf_token_logprobs(hf, tokens)
    fp32: dict[str, Any] = {}
    logps_fp32: dict[str, Any] = {}
    for name, use_te in specs.items():
        model, _ = build_megatron_model(hf_state, arch, torch.float32, device, use_te)
        logps_fp32[name] = megatron_token_logprobs(model, tokens, arch.vocab_size, args.micro_batch)
        fp32[f"{name}_vs_hf"] = errors(logps_fp32[name], reference_fp32)
        del model
        release_memory()
    if "te" in logps_fp32:
        fp32["te_vs_local"] = errors(logps_fp32["te"], logps_fp32["local"])

    # --- bfloat16: judged against transformers' own bf16 error.
    bf16_state = {name: tensor.to(torch.bfloat16) for name, tensor in hf_state.items()}
    hf = hf.to(torch.bfloat16)
    reference_bf16 = hf_token_logprobs(hf, tokens)
    del hf, hf_state
    release_memory()
    bf16: dict[str, Any] = {"hf_bf16_vs_hf_fp32": errors(reference_bf16, reference_fp32)}
    logps_bf16: dict[str, Any] = {}
    speed: dict[str, Any] = {
        "batch": args.throughput_batch,
        "seq": args.throughput_seq,
        "micro_batch": args.micro_batch,
        "iters": args.iters,
    }
    for name, use_te in specs.items():
        model, _ = build_megatron_model(bf16_state, arch, torch.bfloat16, device, use_te)
        logps_bf16[name] = megatron_token_logprobs(model, tokens, arch.vocab_size, args.micro_batch)
        bf16[f"{name}_vs_hf_bf16"] = errors(logps_bf16[name], reference_bf16)
        bf16[f"{name}_vs_hf_fp32"] = errors(logps_bf16[name], reference_fp32)
        speed[f"{name}_bf16_tokens_per_s"] = round(throughput(model, arch.vocab_size, args, device), 1)
        del model
        release_memory()
    if "te" in logps_bf16:
        bf16["te_vs_local"] = errors(logps_bf16["te"], logps_bf16["local"])

    baseline = bf16["hf_bf16_vs_hf_fp32"]["max_abs"]
    checks = {f"fp32_{name}_matches_hf": fp32[f"{name}_vs_hf"]["max_abs"] <= FP32_MAX_ABS for name in specs}
    checks.update(
        {
            f"bf16_{name}_within_hf_bf16_noise": bf16[f"{name}_vs_hf_fp32"]["max_abs"] <= BF16_NOISE_RATIO * baseline + BF16_SLACK
            for name in specs
        }
    )
    if "te" in specs:
        checks["fp32_te_matches_local"] = fp32["te_vs_local"]["max_abs"] <= FP32_MAX_ABS

    result["parity"] = {
        "batch": args.batch,
        "seq": args.seq,
        "float32": fp32,
        "bfloat16": bf16,
        "thresholds": {"fp32_max_abs": FP32_MAX_ABS, "bf16_noise_ratio": BF16_NOISE_RATIO, "bf16_slack": BF16_SLACK},
    }
    result["throughput"] = speed
    if torch.cuda.is_available() and not args.smoke_cpu:
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["checks"] = checks
    result["passed"] = all(checks.values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    destroy_distributed()
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
