"""Single-process pieces of the training package: schedule, sampler, batches, packing,
objective reduction, signals, checkpoint discovery, metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import torch

from nemo_infifpo.data.templates import TokenizedPair, TokenizedSequence
from nemo_infifpo.loss import dpo_loss, infifpo_loss, sequence_scores
from nemo_infifpo.engine.batches import first_fit_decreasing, pack_micro_batches, pad_micro_batches
from nemo_infifpo.training.config import LossConfig
from nemo_infifpo.logprobs import sequence_logprob_sums
from nemo_infifpo.training.objective import Objective, StatLayout
from nemo_infifpo.training.sampler import BatchPlan
from nemo_infifpo.training.schedule import CosineSchedule
from nemo_infifpo.training.signals import StopSignals, stop_signals_deferred

# --------------------------------------------------------------------------- schedule, sampler


def test_cosine_schedule_with_linear_warmup():
    s = CosineSchedule.from_fraction(1e-3, 1e-5, total_steps=100, warmup_fraction=0.1)
    assert s.warmup_steps == 10
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3) and s.lr(99) == pytest.approx(1e-5)
    assert s.lr(10 + 89 // 2) < 1e-3 and all(s.lr(i) >= s.lr(i + 1) for i in range(10, 99))
    assert CosineSchedule.from_fraction(1.0, 0.0, 1, 0.0).lr(0) == 1.0  # a 1-step run still updates


def test_batch_plan_is_seeded_dropping_partial_batches_and_split_over_dp():
    plan = BatchPlan.create(num_rows=10, global_batch_size=4, data_parallel_size=2, seed=3, shuffle=True, max_steps=-1, max_epochs=2)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 4
    epoch0 = plan.global_batch(0) + plan.global_batch(1)
    assert len(set(epoch0)) == 8 and plan.global_batch(2) != plan.global_batch(0)  # reshuffled per epoch
    assert plan.rank_share(1, 0) + plan.rank_share(1, 1) == plan.global_batch(1)
    again = BatchPlan.create(num_rows=10, global_batch_size=4, data_parallel_size=1, seed=3, shuffle=True, max_steps=3, max_epochs=1)
    assert again.global_batch(1) == plan.global_batch(1) and again.total_steps == 3  # max_steps wins
    assert BatchPlan.create(num_rows=10, global_batch_size=4, data_parallel_size=1, seed=3, shuffle=False,
                            max_steps=-1, max_epochs=1).global_batch(1) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan.create(num_rows=3, global_batch_size=4, data_parallel_size=1, seed=0, shuffle=True, max_steps=-1, max_epochs=1)


# --------------------------------------------------------------------------- batches


def _seq(prompt: int, response: int, offset: int) -> TokenizedSequence:
    return TokenizedSequence(input_ids=[(offset + i) % 50 + 1 for i in range(prompt + response)], response_start=prompt)


def _pairs() -> list[TokenizedPair]:
    return [
        TokenizedPair("a", _seq(3, 4, 0), _seq(3, 2, 10)),
        TokenizedPair("b", _seq(5, 1, 20), _seq(5, 6, 30)),
        TokenizedPair("c", _seq(2, 3, 40), _seq(2, 2, 45)),
    ]


def _scores(n: int, sources: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "ref_chosen": -torch.rand(n, generator=g, dtype=torch.float64),
        "ref_rejected": -torch.rand(n, generator=g, dtype=torch.float64),
        "source_chosen": -torch.rand(n, sources, generator=g, dtype=torch.float64),
        "source_rejected": -torch.rand(n, sources, generator=g, dtype=torch.float64),
    }


def test_padded_micro_batch_targets_masks_and_pair_layout():
    pairs = _pairs()
    batches = pad_micro_batches(pairs, [7, 8, 9], _scores(10), micro_batch_size=2, seq_length=16)
    assert [b.num_pairs for b in batches] == [2, 1] and batches[0].row_indices == [7, 8]
    b = batches[0]
    assert b.input_ids.shape == (4, 16) and b.num_sequences == 4  # chosen a, chosen b, rejected a, rejected b
    seq = pairs[1].chosen  # row 1 = chosen of pair "b": prompt 5, response 1
    assert b.labels[1, :5].tolist() == seq.input_ids[1:6]
    assert b.loss_mask[1].nonzero().flatten().tolist() == [4]  # position 4 predicts token 5, the response
    assert b.loss_mask[2].sum() == 2 and b.loss_mask[3].sum() == 6
    assert b.attention_mask.shape == (1, 1, 16, 16) and bool(b.attention_mask[0, 0, 0, 1])
    assert torch.equal(b.scores["ref_chosen"], _scores(10)["ref_chosen"][[7, 8]])
    assert b.num_tokens == 7 + 6 + 5 + 11


def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 7, 3, 2, 4, 6], capacity=10)
    assert bins == [[1, 2], [5, 4], [0, 3]]
    assert sorted(i for b in bins for i in b) == list(range(6))
    with pytest.raises(ValueError, match="exceeds the bin capacity"):
        first_fit_decreasing([11], capacity=10)


def test_packed_micro_batch_keeps_pairs_together_with_block_diagonal_attention():
    pairs = _pairs()
    batches = pack_micro_batches(pairs, [0, 1, 2], _scores(3), bin_length=20)
    assert sorted(r for b in batches for r in b.row_indices) == [0, 1, 2]
    for b in batches:
        assert b.input_ids.shape == (1, 20) and b.num_sequences == 2 * b.num_pairs
        mask = b.attention_mask[0, 0]
        # Position 0 of the second sequence in the bin sees only itself.
        first = pairs[b.row_indices[0]].chosen
        n = len(first)
        assert b.position_ids[0, n] == 0
        assert bool(mask[n, n - 1]) and not bool(mask[n, n])
    # Per-sequence sums from a packed layout equal those from the padded layout.
    padded = pad_micro_batches(pairs, [0, 1, 2], _scores(3), micro_batch_size=3, seq_length=12)[0]
    values = {}
    for b in [padded, *batches]:
        token_logps = torch.sin(b.labels.double() + 0.1 * b.position_ids)  # a function of (token, position)
        sums, counts = sequence_logprob_sums(token_logps, b.loss_mask, b.sequence_index, b.num_sequences)
        for k, row in enumerate(b.row_indices):
            values.setdefault(row, []).append((float(sums[k]), float(sums[b.num_pairs + k]), int(counts[k])))
    for row, (first_layout, second_layout) in values.items():
        assert first_layout == pytest.approx(second_layout), row


def test_sft_batches_hold_only_chosen_sequences():
    batch = pad_micro_batches(_pairs(), [0, 1, 2], {}, micro_batch_size=3, seq_length=12, chosen_only=True)[0]
    assert batch.num_sequences == 3 and batch.input_ids.shape[0] == 3
    packed = pack_micro_batches(_pairs(), [0, 1, 2], {}, bin_length=30, chosen_only=True)
    assert sum(b.num_sequences for b in packed) == 3


# --------------------------------------------------------------------------- objective


def _objective_inputs(pairs: int, sources: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sums = -torch.rand(2 * pairs, generator=g) * 20
    counts = torch.randint(1, 15, (2 * pairs,), generator=g)
    return sums, counts, _scores(pairs, sources)


@pytest.mark.parametrize("kind", ["infifpo", "ipo", "dpo"])
def test_objective_is_the_loss_module_as_sum_and_count(kind):
    config = LossConfig(type=kind, beta=2.5, length_norm=True)
    objective = Objective(config, ("q", "l"))
    sums, counts, scores = _objective_inputs(5)
    loss_sum, count, stats = objective(sums, counts, 5, scores)
    policy = sequence_scores(sums, counts, length_norm=True)
    if kind == "dpo":
        expected, _ = dpo_loss(policy[:5], policy[5:], scores["ref_chosen"], scores["ref_rejected"], beta=2.5)
    else:
        expected, _ = infifpo_loss(policy[:5], policy[5:], scores["ref_chosen"], scores["ref_rejected"],
                                   scores["source_chosen"], scores["source_rejected"], beta=2.5,
                                   loss_type="ipo" if kind == "ipo" else "sigmoid")
    assert int(count) == 5 and float(loss_sum) == pytest.approx(float(expected.sum()))
    assert objective.summarize(stats)["loss"] == pytest.approx(float(expected.mean()))


def test_sum_and_count_give_the_global_mean_whatever_the_split():
    objective = Objective(LossConfig(), ("q", "l"))
    sums, counts, scores = _objective_inputs(6)
    whole_sum, whole_count, whole_stats = objective(sums, counts, 6, scores)
    parts = []
    for rows in ([0, 1], [2], [3, 4, 5]):
        index = torch.tensor(rows)
        both = torch.cat([index, index + 6])
        parts.append(objective(sums[both], counts[both], len(rows), {k: v[index] for k, v in scores.items()}))
    total_sum = sum(float(p[0]) for p in parts)
    total_count = sum(int(p[1]) for p in parts)
    assert total_sum / total_count == pytest.approx(float(whole_sum) / int(whole_count))
    merged = objective.summarize(sum(p[2] for p in parts))
    assert merged == pytest.approx(objective.summarize(whole_stats))
    assert sum(v for k, v in merged.items() if k.startswith("fusion/selected/")) == 6


def test_stats_are_packed_and_read_back_by_name():
    layout = StatLayout(("loss", "pairs", "weight/p0"))
    packed = layout.pack({"pairs": torch.tensor(2), "weight/p0": torch.tensor(0.5), "loss": torch.tensor(1.5)})
    assert packed.dtype == torch.float64 and packed.tolist() == [1.5, 2.0, 0.5]
    assert layout.unpack(packed + packed) == {"loss": 3.0, "pairs": 4.0, "weight/p0": 1.0}
    with pytest.raises(KeyError, match="do not match the layout"):
        layout.pack({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="layout of 3 names"):
        layout.unpack(torch.zeros(2))
    # The objective's vector follows its layout: each named sum is where the layout says.
    objective = Objective(LossConfig(), ("q", "l"))
    sums, counts, scores = _objective_inputs(4)
    loss_sum, _, stats = objective(sums, counts, 4, scores)
    named = objective.stats.unpack(stats)
    assert named["loss"] == pytest.approx(float(loss_sum)) and named["pairs"] == 4.0
    assert named["weight/q"] + named["weight/l"] + named["weight/p0"] == pytest.approx(4.0)


def test_sft_objective_is_token_mean_nll():
    objective = Objective(LossConfig(type="sft"))
    sums = torch.tensor([-4.0, -9.0])
    counts = torch.tensor([2, 3])
    loss_sum, count, stats = objective(sums, counts, 2, {})
    assert float(loss_sum) == 13.0 and int(count) == 5
    assert objective.summarize(stats)["loss"] == pytest.approx(13.0 / 5)


def test_non_finite_log_probs_give_a_nan_loss_not_an_exception():
    objective = Objective(LossConfig(), ("q",))
    sums, counts, scores = _objective_inputs(2, sources=1)
    sums[1] = float("nan")
    loss_sum, _, stats = objective(sums, counts, 2, scores)
    assert math.isnan(float(loss_sum)) and math.isnan(objective.summarize(stats)["loss"])


# --------------------------------------------------------------------------- signals, checkpoints, metrics


def test_stop_signals_record_and_restore():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        assert not signals.stop_requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1 and signals.stop_requested(torch.device("cpu"))
    assert signal.getsignal(signal.SIGUSR1) == before


def _sleep_then_exit() -> None:  # a spawned child, like dist_checkpointing's writer helpers
    import time

    time.sleep(1.0)


def test_stop_signals_are_deferred_during_a_save_and_spare_helper_processes():
    import multiprocessing

    with StopSignals() as signals:
        with stop_signals_deferred():
            child = multiprocessing.get_context("spawn").Process(target=_sleep_then_exit)
            child.start()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert signals.received is None  # held back while the "save" runs
        assert signals.received == signal.SIGUSR1  # delivered once it is over
        os.kill(child.pid, signal.SIGUSR1)  # Slurm signals every process of the step
        child.join(timeout=30)
    assert child.exitcode == 0  # the helper survived and finished its work


def test_find_latest_checkpoint_ignores_incomplete_ones(tmp_path):
    from nemo_infifpo.models.checkpoint import METADATA_FILE
    from nemo_infifpo.training.checkpoint import TRAINER_STATE_FILE, find_latest_checkpoint

    root = tmp_path / "checkpoints"
    assert find_latest_checkpoint(tmp_path) is None
    for step, complete in ((2, True), (4, True), (6, False)):
        path = root / f"step_{step:07d}"
        (path / "train_state").mkdir(parents=True)
        (path / METADATA_FILE).write_text("{}")
        if complete:
            (path / TRAINER_STATE_FILE).write_text("{}")
    (root / ".tmp.step_0000008").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "step_0000004"  # newest complete
    (root / "latest").write_text("step_0000002\n")
    assert find_latest_checkpoint(tmp_path).name == "step_0000002"  # the pointer wins
    (root / "latest").write_text("step_0000006\n")
    assert find_latest_checkpoint(tmp_path).name == "step_0000004"  # ...unless it names a partial one


def test_metrics_logger_truncates_steps_after_the_resumed_one(tmp_path):
    from nemo_infifpo.training.config import LoggingConfig
    from nemo_infifpo.training.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), enabled=True,
                           total_steps=6, start_step=2, run_config={})
    logger.log({"step": 3, "loss": 0.5, "lr": 1e-3})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_training_flops_is_about_six_n_per_token():
    from types import SimpleNamespace

    from nemo_infifpo.training.metrics import training_flops

    phi4 = SimpleNamespace(hidden_size=5120, num_layers=40, num_attention_heads=40, num_query_groups=10,
                           head_dim=128, ffn_hidden_size=17920, vocab_size=100352)
    per_token = training_flops(phi4, [1]) / 1
    assert per_token == pytest.approx(6 * 14.2e9, rel=0.03)  # 6 x (params without the input embedding)
    assert training_flops(phi4, [4096]) > 4096 * per_token  # attention grows with length


# --------------------------------------------------------------------------- scoring setup vs training


def _train_config(**model):
    from nemo_infifpo.training.config import parse_config

    return parse_config({"model": {"path": "p0", **model}, "data": {"path": "train.parquet"}, "output_dir": "o"})


def test_a_pivot_scored_in_another_dtype_is_named_before_any_model_is_built():
    from nemo_infifpo.training.config import ConfigError
    from nemo_infifpo.training.dataset import check_scoring_setup

    with pytest.raises(ConfigError) as error:
        check_scoring_setup(_train_config(precision="fp32"), {"dtype": "bfloat16", "backend": "megatron"})
    message = str(error.value)
    assert "train.parquet" in message and "scored in bfloat16" in message and "model.precision=fp32" in message
    assert "rescore the pivot with dtype=float32" in message and "model.precision=bf16" in message
    check_scoring_setup(_train_config(precision="fp32"), {"dtype": "float32", "backend": "hf"})  # fp32: fine


def test_in_bf16_the_scoring_layout_and_back_end_must_match():
    from nemo_infifpo.training.config import ConfigError
    from nemo_infifpo.training.dataset import check_scoring_setup

    bf16 = _train_config(precision="bf16", tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    check_scoring_setup(bf16, {"dtype": "bfloat16", "backend": "megatron",
                               "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"scored at TP=1 PP=1 but training runs TP=2 PP=2.*tensor_model_parallel_size=2"):
        check_scoring_setup(bf16, {"dtype": "bfloat16", "backend": "megatron",
                                   "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})
    with pytest.raises(ConfigError, match="'hf' back end.*model.backend=megatron"):
        check_scoring_setup(bf16, {"dtype": "bfloat16", "backend": "hf"})


def test_without_the_parity_check_a_scoring_mismatch_is_only_logged(caplog):
    from nemo_infifpo.training.config import parse_config
    from nemo_infifpo.training.dataset import check_scoring_setup

    config = parse_config({"model": {"path": "p0"}, "data": {"path": "t"}, "output_dir": "o",
                           "trainer": {"step0_parity_check": False}})
    check_scoring_setup(config, {"dtype": "bfloat16"})
    assert "scored in bfloat16" in caplog.text


_WEIGHT_DECAY_SCRIPT = r"""
import json, sys, tempfile
from megatron.core.optimizer import OptimizerConfig, _get_param_groups
from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
from nemo_infifpo.models.checkpoint import load_megatron_model
from nemo_infifpo.testing.models import save_tiny_hf_model
from nemo_infifpo.training.optimizer import apply_param_group_schedule, effective_weight_decay

init_distributed(1, 1, device="cpu")
model = load_megatron_model(save_tiny_hf_model("qwen2", tempfile.mkdtemp()), use_transformer_engine=False).model
names = {id(p): n for n, p in model.named_parameters()}
# megatron's own parameter groups, handed to Adam with the config's weight_decay as the
# default of every group, as get_megatron_optimizer does
import torch
groups = _get_param_groups([model], OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1), None)
groups = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1).param_groups
built = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
apply_param_group_schedule(groups, 2e-4, 0.1)
applied = {names[id(p)]: [g["weight_decay"], g["lr"]] for g in groups for p in g["params"]}
ours = {n: effective_weight_decay(n, p, 0.1) for n, p in model.named_parameters()}
destroy_distributed()
print("RESULT" + json.dumps({"built": built, "applied": applied, "ours": ours}))
"""


@pytest.mark.slow
def test_gpu_optimizer_groups_get_the_cpu_paths_weight_decay():
    """megatron's Adam groups carry the full weight_decay (and wd_mult=0 for norms and biases);
    after apply_param_group_schedule every parameter has the decay the CPU path gives it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WEIGHT_DECAY_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    no_decay = {n for n, wd in out["ours"].items() if wd == 0.0}
    assert any("layernorm" in n or "norm" in n for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert any(out["built"][n] == 0.1 for n in no_decay)  # what megatron's groups hold before
    assert {n: v[0] for n, v in out["applied"].items()} == pytest.approx(out["ours"])
    assert all(v[1] == pytest.approx(2e-4) for v in out["applied"].values())


@pytest.mark.parametrize("loss", [
    {"type": "infifpo"}, {"type": "infifpo", "fusion": "confidence", "length_norm": False},
    {"type": "ipo", "fusion": "mean"}, {"type": "dpo"}, {"type": "sft"},
])
def test_the_loss_path_never_reads_values_back_to_the_host(loss):
    """The per-micro-batch path (vocab-parallel log-probs -> per-sequence sums -> objective ->
    backward) runs on meta tensors, which have no values: any host synchronisation (.item(),
    bool(), float() of a tensor) would raise. On a GPU each such read stalls the 1F1B schedule."""
    from nemo_infifpo.logprobs import sequence_logprob_sums, vocab_parallel_token_logprobs
    from nemo_infifpo.training.config import LossConfig
    from nemo_infifpo.training.objective import Objective

    meta = torch.device("meta")
    objective = Objective(LossConfig(**loss), ("qwen", "llama"))
    pairs = 3
    sequences = pairs if objective.is_sft else 2 * pairs
    logits = torch.empty(sequences, 16, 50, device=meta, requires_grad=True)
    labels = torch.zeros(sequences, 16, dtype=torch.long, device=meta)
    token_logps = vocab_parallel_token_logprobs(logits, labels, vocab_size=48)
    sums, counts = sequence_logprob_sums(
        token_logps, torch.ones(sequences, 16, dtype=torch.bool, device=meta),
        torch.zeros(sequences, 16, dtype=torch.long, device=meta), sequences,
    )
    scores = {name: torch.empty(pairs, dtype=torch.float64, device=meta) for name in ("ref_chosen", "ref_rejected")}
    scores.update({name: torch.empty(pairs, 2, dtype=torch.float64, device=meta) for name in ("source_chosen", "source_rejected")})
    loss_sum, count, stats = objective(sums, counts, pairs, scores)
    loss_sum.backward()
    assert stats.shape == (len(objective.stat_names),) and count.device == meta


# --------------------------------------------------------------------------- row policy in training


def _sft_rows_file(tmp_path, n_rows: int, n_system: int):
    rows = []
    for i in range(n_rows):
        prompt = [{"role": "user", "content": f"Say {i}."}]
        if i < n_system:  # the template below drops a system message: these rows cannot be encoded
            prompt = [{"role": "system", "content": "Be brief."}, *prompt]
        rows.append({"id": f"r{i:03d}", "prompt": prompt, "chosen": f"{i}.", "rejected": f"{i + 1}."})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_config(tmp_path, data_path, **data):
    from nemo_infifpo.testing.chat_templates import SYSTEM_IF_LAST_USER
    from nemo_infifpo.testing.tokenizers import chatml_tokenizer, save_tokenizer
    from nemo_infifpo.training.config import parse_config

    tokenizer_dir = save_tokenizer(chatml_tokenizer(), tmp_path / "tok")
    return parse_config({
        "model": {"path": str(tmp_path / "unused")}, "output_dir": str(tmp_path / "out"), "loss": {"type": "sft"},
        "tokenizer": {"path": str(tokenizer_dir), "chat_template": SYSTEM_IF_LAST_USER},
        "data": {"path": str(data_path), "max_length": 500, **data},
    })


def test_training_leaves_out_rows_the_pivot_template_cannot_encode(tmp_path, caplog):
    from nemo_infifpo.training.dataset import load_training_data

    config = _sft_config(tmp_path, _sft_rows_file(tmp_path, 100, 1))
    with caplog.at_level(logging.WARNING):
        data = load_training_data(config)
    assert len(data) == 99 and "r000" not in data.ids
    assert "1 of 100 rows cannot be encoded" in caplog.text and "system message" in caplog.text


def test_training_stops_above_the_excluded_fraction_or_under_fail(tmp_path):
    from nemo_infifpo.data.policy import TooManyExcludedRows
    from nemo_infifpo.data.templates import TemplateError
    from nemo_infifpo.training.dataset import load_training_data

    with pytest.raises(TooManyExcludedRows, match=r"2 of 100 rows are invalid \(stage train, model pivot"):
        load_training_data(_sft_config(tmp_path, _sft_rows_file(tmp_path, 100, 2)))
    with pytest.raises(TemplateError, match="dropped the system message"):
        load_training_data(_sft_config(tmp_path, _sft_rows_file(tmp_path, 100, 1), on_invalid_row="fail"))
