"""Scoring preprocessing (chat-template rendering + tokenisation) per node, before and after
the ranks share it.

Rows like the paper's (a ~150-word prompt, two ~400-word answers) under a ChatML-style
template with a long default system prompt, tokenised by a byte-level BPE with a large
vocabulary (``--vocab``, default Phi-4's 100352) trained on the spot (nothing is downloaded).

* ``before``: every rank renders and tokenises every row twice (the row-policy check, then
  its shard) before its first forward pass: the node waits ``2 N / r`` seconds whatever the
  number of ranks (``r``: one core's rows/s, measured here).
* ``after``: ``nemo_infifpo.scoring.preprocess.measure_rows`` with ``--ranks`` processes
  (gloo): each measures ``N / W`` rows; the first forward pass then waits only for its own
  batch. Measured wall time, and the node rate it gives.

Prints one JSON object. The speed-up the processes show is bounded by the cores of the
machine (``cpu_count``); ``per_rank_work_ratio`` is the exact reduction of each rank's work.

    python benchmarks/scoring_preprocessing.py --rows 2000 --ranks 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYLLABLES = "ka lo mi ne ru sa ti vo pe da gu ri fo ze ha ju".split()
SYSTEM_PROMPT_WORDS = 400  # a long default system prompt, as some real templates insert


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def _text(rng: random.Random, words: int) -> str:
    return " ".join(_word(rng) for _ in range(words)) + "."


def build_tokenizer(directory: Path, vocab: int, seed: int) -> tuple[Path, int]:
    """A byte-level BPE of ``vocab`` tokens with a ChatML-style template and a long system prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [_text(rng, 200) for _ in range(4000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    system = _text(random.Random(seed + 1), SYSTEM_PROMPT_WORDS)
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)
    fast.save_pretrained(directory)
    return directory, len(fast)


def write_rows(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed + 2)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            row = {"id": f"p{i:07d}", "prompt": _text(rng, 150), "chosen": _text(rng, 400), "rejected": _text(rng, 400)}
            handle.write(json.dumps(row) + "\n")
    return path


def single_core_rate(tokenizer_dir: Path, data: Path, sample: int) -> float:
    from nemo_infifpo.data.rows import load_preference_rows
    from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer

    rows = load_preference_rows(data)[:sample]
    tokenizer = ResponseTokenizer(load_tokenizer(tokenizer_dir))
    started = time.perf_counter()
    for row in rows:
        tokenizer.encode_pair(row)
    return len(rows) / (time.perf_counter() - started)


def worker(tokenizer_dir: Path, data: Path) -> None:
    """One rank under torchrun: measure_rows over all rows; rank 0 prints its wall time."""
    import torch.distributed as dist

    from nemo_infifpo.data.policy import RowPolicy
    from nemo_infifpo.data.rows import load_preference_rows
    from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer
    from nemo_infifpo.scoring.backends import open_world
    from nemo_infifpo.scoring.preprocess import measure_rows

    rows = load_preference_rows(data)
    tokenizer = ResponseTokenizer(load_tokenizer(tokenizer_dir))
    world = open_world("hf")
    world.barrier()
    started = time.perf_counter()
    measured = measure_rows(tokenizer, rows, world, RowPolicy(), model="bench")
    seconds = time.perf_counter() - started
    if world.rank == 0:
        print("RESULT" + json.dumps({"seconds": seconds, "rows": len(rows), "measured": len(measured.lengths)}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("TOKENIZER_DIR", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0

    work = Path(tempfile.mkdtemp(prefix="scoring_preprocessing."))
    started = time.perf_counter()
    tokenizer_dir, vocab = build_tokenizer(work / "tokenizer", args.vocab, args.seed)
    data = write_rows(work / "rows.jsonl", args.rows, args.seed)
    setup_s = time.perf_counter() - started
    rate = single_core_rate(tokenizer_dir, data, min(args.rows, 300))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with socket.socket() as probe:  # a free local port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", str(tokenizer_dir), str(data)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        print(json.dumps({"error": "the ranks failed", "stderr": proc.stderr[-3000:]}))
        return 1
    after = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])

    n = args.rows
    before_s = 2 * n / rate  # every rank: all rows, twice, serially
    result = {
        "rows": n,
        "ranks": args.ranks,
        "cpu_count": os.cpu_count(),
        "vocab": vocab,  # what BPE reached on the synthetic corpus (asked: --vocab)
        "system_prompt_words": SYSTEM_PROMPT_WORDS,
        "setup_s": round(setup_s, 1),
        "single_core_rows_per_s": round(rate, 1),
        "before": {"node_wait_s": round(before_s, 2), "node_rows_per_s": round(n / before_s, 1)},
        "after": {"measured_wall_s": round(after["seconds"], 2), "node_rows_per_s": round(n / after["seconds"], 1)},
        "speedup_vs_single_core": round(n / after["seconds"] / rate, 2),
        "speedup_vs_before": round(before_s / after["seconds"], 2),
        "per_rank_work_ratio": round((n / args.ranks) / (2 * n), 4),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
