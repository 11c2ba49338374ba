"""build_pairs at the paper's scale: time and peak memory of the streaming join.

The paper's data construction: 150k prompts, answered 8 times by the pivot and 4 times by each
of 5 sources = 28 candidates per prompt, 4.2M answers. This writes synthetic generation and
judge outputs in the stages' on-disk format (answers of 200-4000 characters of pseudo-English,
mean ~2.1k, about 500 tokens; 5% truncated, 1% empty, 1% duplicates), then runs
recipes/build_pairs.py in a child process and prints JSON: the child's wall time and peak RSS,
rows written, and, for ``--fraction`` < 1, the time extrapolated linearly to the full scale
(memory does not grow with the answers: it holds the prompts and one prompt's candidates).

    python benchmarks/build_pairs_streaming.py                     # full scale: 150k x 28
    python benchmarks/build_pairs_streaming.py --fraction 0.1      # 15k prompts, extrapolated
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_PROMPTS = 150_000
PAPER_SAMPLES = {"pivot": 8, **{f"source{i}": 4 for i in range(1, 6)}}  # 28 candidates per prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the paper's 150k prompts")
    parser.add_argument("--workdir", default=None, help="where the synthetic outputs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic outputs")
    parser.add_argument("--shards", type=int, default=32, help="shards of each generation output and of the judge")
    args = parser.parse_args()

    from nemo_infifpo.testing.candidates import write_synthetic_run

    prompts = max(1, round(PAPER_PROMPTS * args.fraction))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="build-pairs-bench-"))
    started = time.perf_counter()
    run = write_synthetic_run(root / "inputs", num_prompts=prompts, samples=PAPER_SAMPLES, answer_chars=(200, 4000),
                              generation_shards=args.shards, judge_shards=args.shards, seed=0)
    write_seconds = time.perf_counter() - started
    input_bytes = sum(p.stat().st_size for p in (root / "inputs").rglob("*") if p.is_file())

    command = [sys.executable, str(REPO / "recipes" / "build_pairs.py"), f"data.path={run['prompts']}",
               "generation_dirs=[" + ",".join(str(d) for d in run["generation_dirs"]) + "]",
               f"judge_dir={run['judge_dir']}", f"output_dir={root / 'pairs'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    report = json.loads((root / "pairs" / "report.json").read_text())
    answers = prompts * sum(PAPER_SAMPLES.values())
    output = {
        "prompts": prompts,
        "candidates_per_prompt": sum(PAPER_SAMPLES.values()),
        "answers": answers,
        "fraction_of_paper_scale": prompts / PAPER_PROMPTS,
        "input_gb_on_disk": round(input_bytes / 1e9, 3),
        "synthetic_write_seconds": round(write_seconds, 1),
        "build_pairs_seconds": round(seconds, 1),
        "build_pairs_peak_rss_mb": round(peak_rss_mb, 1),
        "answers_per_second": round(answers / seconds),
        "rows_written": {"sft": report["prompts"]["sft"], "preference": report["prompts"]["preference"]},
        "output_gb": round(sum((root / "pairs" / n).stat().st_size for n in ("sft.jsonl", "pairs.jsonl")) / 1e9, 3),
        "cpu_count": os.cpu_count(),
    }
    if prompts < PAPER_PROMPTS:
        output["extrapolated_paper_scale_seconds"] = round(seconds * PAPER_PROMPTS / prompts, 1)
    print(json.dumps(output, indent=2))
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
