"""Peak extra memory of token log-probs: naive full-vocabulary log_softmax vs chunked-from-hidden.

    python benchmarks/logprob_memory.py [--tokens 4096] [--vocab 100352] [--hidden 512]
                                        [--chunk-size 512] [--backward]

Prints one JSON object: naive_peak_bytes, chunked_peak_bytes, ratio (chunked / naive),
max_abs_err, naive_seconds, chunked_seconds, device, and the sizes used.

"Extra" memory is what the computation allocates beyond its inputs (hidden, weight, labels).
On CUDA it is ``torch.cuda.max_memory_allocated`` above the inputs. On CPU, torch's allocator
exposes no counters, so each path runs in its own subprocess and the extra memory is the rise
of the process's peak resident set size (``ru_maxrss``) over the value measured right after
the inputs were created; the subprocesses also keep one path's freed pages from hiding the
other's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nemo_infifpo.logprobs import token_logprobs_from_hidden  # noqa: E402


def make_inputs(tokens: int, vocab: int, hidden: int, device: torch.device, grad: bool):
    """Deterministic inputs, created in place so no temporary inflates the baseline."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.empty(tokens, hidden, device=device).normal_(generator=gen)
    w = torch.empty(vocab, hidden, device=device).normal_(std=hidden**-0.5, generator=gen)
    labels = torch.empty(tokens, dtype=torch.long, device=device).random_(0, vocab, generator=gen)
    return h.requires_grad_(grad), w.requires_grad_(grad), labels


def run_path(path: str, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int, backward: bool):
    if path == "naive":
        out = torch.log_softmax(h @ w.t(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        out = token_logprobs_from_hidden(h, w, labels, chunk_size=chunk)
    if backward:
        out.sum().backward()
    return out.detach()


def max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One path in a fresh process; writes {peak_bytes, seconds} and the output tensor."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    h, w, labels = make_inputs(args.tokens, args.vocab, args.hidden, torch.device("cpu"), args.backward)
    baseline = max_rss_bytes()
    start = time.perf_counter()
    out = run_path(args.worker, h, w, labels, args.chunk_size, args.backward)
    seconds = time.perf_counter() - start
    peak = max_rss_bytes() - baseline
    torch.save(out, args.out + ".pt")
    Path(args.out + ".json").write_text(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def measure_cpu(args: argparse.Namespace) -> dict[str, object]:
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("naive", "chunked"):
            out = os.path.join(tmp, path)
            cmd = [sys.executable, __file__, "--worker", path, "--out", out, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
            if args.backward:
                cmd.append("--backward")
            subprocess.run(cmd, check=True)
            results[path] = json.loads(Path(out + ".json").read_text())
            outputs[path] = torch.load(out + ".pt")
    return {
        "naive_peak_bytes": results["naive"]["peak_bytes"],
        "chunked_peak_bytes": results["chunked"]["peak_bytes"],
        "naive_seconds": results["naive"]["seconds"],
        "chunked_seconds": results["chunked"]["seconds"],
        "max_abs_err": float((outputs["naive"] - outputs["chunked"]).abs().max()),
        "device": "cpu",
        "method": "ru_maxrss rise over inputs, one subprocess per path",
    }


def measure_cuda(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cuda")
    h, w, labels = make_inputs(args.tokens, args.vocab, args.hidden, device, args.backward)
    res: dict[str, object] = {}
    outputs = {}
    for path in ("naive", "chunked"):
        if h.grad is not None:
            h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        outputs[path] = run_path(path, h, w, labels, args.chunk_size, args.backward)
        torch.cuda.synchronize()
        res[f"{path}_seconds"] = time.perf_counter() - start
        res[f"{path}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    res["max_abs_err"] = float((outputs["naive"] - outputs["chunked"]).abs().max())
    res["device"] = torch.cuda.get_device_name()
    res["method"] = "torch.cuda.max_memory_allocated above inputs"
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--hidden", type=int, default=512, help="5120 for Phi-4 (slow on CPU)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--backward", action="store_true", help="include the backward pass")
    parser.add_argument("--cpu", action="store_true", help="measure on CPU even if CUDA is available")
    parser.add_argument("--worker", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    use_cuda = torch.cuda.is_available() and not args.cpu
    res = measure_cuda(args) if use_cuda else measure_cpu(args)
    res["ratio"] = res["chunked_peak_bytes"] / max(1, res["naive_peak_bytes"])
    res.update(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, chunk_size=args.chunk_size,
               backward=args.backward)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
