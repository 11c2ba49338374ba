"""Megatron models converted from HF checkpoints match transformers at every TP/PP layout.

One 4-rank torchrun launch does all the multi-process work (each launch pays seconds of
python + megatron start-up per rank): it builds the tiny HF models, imports them, and for
TP=2 x PP=2, DP=4 (TP=PP=1), TP=2, PP=2, an uneven PP=2 split (1 + 3 layers) and PP=4
measures log-prob and gradient parity against transformers and exports the imports back
to HF. The tests below assert on what it recorded, case by case. The two recipes run once,
as users call them.

Tolerances (float32 on CPU): megatron and transformers run the same math in a different
order (fused QKV GEMM, TP partial sums, vocab-parallel log-softmax), so per-token log-probs
agree to ~1e-5 abs (asserted: 1e-4), and gradients to ~1e-5 relative (L2 norm of the
difference over the norm of transformers' gradient, per tensor; asserted: 1e-4). A mapping
error (swapped heads, gate/up order, a missing bias, wrong rotary dims) shows up at 1e-1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrun import REPO, run_torchrun
from workers.models_common import CASES, CORE_CASES, EXTRA_IMPORTS, SEQ

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-4
GRAD_RTOL = 1e-4

# TP x PP [/layers on the first stage] on 4 ranks (the rest is data parallel), in run
# order: 2x2 first, its saves are re-loaded at the others.
LAYOUTS = ("2x2", "1x1", "2x1", "1x2", "1x2/1")
# PP=4 (one layer per stage, two stages with neither embedding nor output layer), tied
# embeddings across the first and last stage: a smaller set of cases.
PP4_CASES = ("phi3_tied", "qwen2_tied", "llama")
ALL_LAYOUTS = (*LAYOUTS, "1x4")
RESHARD_SOURCES = tuple(f"saved/2x2/{case}" for case in CORE_CASES)
EXPORT_ONLY = (*(f"ckpt/{name}" for name in EXTRA_IMPORTS), *RESHARD_SOURCES)


def _tag(layout: str) -> str:
    return layout.replace("/", "f")


def _run_python(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def results(root: Path) -> dict:
    run_torchrun(
        "models_parity.py",
        str(root),
        f"--layouts={','.join(LAYOUTS)},1x4:{'+'.join(PP4_CASES)}",
        f"--cases={','.join(CASES)}",
        "--save-at=2x2",
        f"--export-only={','.join(EXPORT_ONLY)}",
        nproc=4,
    )
    return json.loads((root / "results.json").read_text())


PARITY_RUNS = [(case, layout) for layout in LAYOUTS for case in CASES] + [(case, "1x4") for case in PP4_CASES]


def _ids(runs: list[tuple[str, str]]) -> list[str]:
    return [f"{case}@{layout}" for case, layout in runs]


@pytest.mark.parametrize(("case", "layout"), PARITY_RUNS, ids=_ids(PARITY_RUNS))
def test_token_logprobs_match_transformers(results: dict, case: str, layout: str) -> None:
    result = results[f"{case}@{_tag(layout)}"]
    assert result["logprob_max_abs_err"] <= LOGPROB_ATOL, result


@pytest.mark.parametrize(("case", "layout"), PARITY_RUNS, ids=_ids(PARITY_RUNS))
def test_logprob_gradients_match_transformers(results: dict, case: str, layout: str) -> None:
    result = results[f"{case}@{_tag(layout)}"]
    assert result["grad_names_match"], result
    assert result["grad_max_rel_err"] <= GRAD_RTOL, result
    # Vocabulary padding rows are -inf logits: they must never receive gradient.
    assert result["padded_row_grad_max"] == 0.0, result


# --------------------------------------------------------------------------- round trips


def _safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / file))
    assert set(tensors) == set(index["weight_map"]), "index and shard contents disagree"
    return tensors


def assert_same_hf_weights(exported: Path, original: Path) -> None:
    got, expected = _safetensors_dir(exported), _safetensors_dir(original)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs after the round trip"


@pytest.mark.parametrize(("case", "layout"), PARITY_RUNS, ids=_ids(PARITY_RUNS))
def test_import_then_export_at_any_layout_is_bit_exact(results: dict, root: Path, case: str, layout: str) -> None:
    exported = root / "export" / _tag(layout) / case
    assert_same_hf_weights(exported, root / "hf" / case)
    for asset in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (exported / asset).is_file(), asset


@pytest.mark.parametrize("layout", ALL_LAYOUTS[1:])
@pytest.mark.parametrize("source", RESHARD_SOURCES)
def test_checkpoint_saved_at_tp2_pp2_reloads_at_other_layouts(results: dict, root: Path, source: str, layout: str) -> None:
    case = source.rsplit("/", 1)[1]
    assert_same_hf_weights(root / "export" / _tag(layout) / source.replace("/", "_"), root / "hf" / case)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_odd_padded_vocab_repads_when_tp_cannot_split_it(results: dict, root: Path, layout: str) -> None:
    (name, (case, _)), = EXTRA_IMPORTS.items()
    result = results[f"ckpt_{name}@{_tag(layout)}"]
    tp = int(layout.split("x")[0])
    vocab = 301
    assert result["padded_vocab_size"] == (vocab if tp == 1 else 384)
    assert_same_hf_weights(root / "export" / _tag(layout) / f"ckpt_{name}", root / "hf" / case)


def test_exported_model_gives_identical_logits(results: dict, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    for case in ("phi3", "qwen2_tied"):
        original = AutoModelForCausalLM.from_pretrained(root / "hf" / case, dtype=torch.float32).eval()
        exported = AutoModelForCausalLM.from_pretrained(root / "export" / "2x1" / case, dtype=torch.float32).eval()
        tokens = torch.randint(0, original.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.equal(original(tokens).logits, exported(tokens).logits), case


# --------------------------------------------------------------------------- recipes


def test_import_and_export_recipes_round_trip(root: Path, tmp_path: Path) -> None:
    """The Hydra entry points, as users call them: import, then export in bfloat16."""
    hf_dir = root / "hf" / "phi3"
    _run_python(REPO / "recipes" / "import_hf.py", f"hf_path={hf_dir}", f"output_path={tmp_path / 'ckpt'}")
    metadata = json.loads((tmp_path / "ckpt" / "nemo_infifpo_model.json").read_text())
    assert metadata["architecture"] == "Phi3ForCausalLM"
    assert metadata["vocab_size"] == 301 and metadata["padded_vocab_size"] == 384
    assert metadata["source_fingerprint"]

    _run_python(
        REPO / "recipes" / "export_hf.py",
        f"checkpoint_path={tmp_path / 'ckpt'}",
        f"output_path={tmp_path / 'out'}",
        "max_shard_size=100KB",
        "dtype=bfloat16",
    )
    got, expected = _safetensors_dir(tmp_path / "out"), _safetensors_dir(hf_dir)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in expected.items())
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
