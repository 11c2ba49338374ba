"""Training configuration: the shipped YAML files parse; mistakes name the key and the options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_infifpo.training.config import LOSS_TYPES, ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REQUIRED = {"model": {"path": "/m"}, "data": {"path": "/d"}, "output_dir": "/o"}


def load_yaml(name: str, **fill) -> dict:
    """A shipped config as Hydra would hand it over: without its hydra/defaults nodes."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    raw.pop("hydra"), raw.pop("defaults")
    raw["model"]["path"], raw["data"]["path"], raw["output_dir"] = "/m", "/d", "/o"
    return raw


def test_phi4_config_has_the_paper_hyperparameters():
    c = parse_config(load_yaml("infifpo_phi4"))
    assert (c.loss.type, c.loss.beta, c.loss.length_norm, c.loss.fusion, c.loss.clip) == ("infifpo", 2.5, True, "max_margin", True)
    assert (c.optim.lr, c.optim.warmup_fraction, c.trainer.max_epochs, c.trainer.max_steps) == (1e-7, 0.1, 1, -1)
    assert (c.model.global_batch_size, c.data.max_length) == (128, 4096)
    m = c.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.precision) == (2, 2, "bf16")
    assert m.sequence_parallel and m.recompute == "selective" and m.use_distributed_optimizer
    text = (CONFIGS / "infifpo_phi4.yaml").read_text()
    assert "14.7B" in text and "18 bytes/param" in text  # the memory arithmetic sits next to it


def test_sft_and_tiny_configs():
    sft = parse_config(load_yaml("sft_phi4"))
    assert (sft.loss.type, sft.trainer.max_epochs, sft.optim.lr) == ("sft", 3, 1e-6)
    assert not sft.needs_p0_scores
    tiny = parse_config(load_yaml("infifpo_tiny"))
    assert tiny.model.precision == "fp32" and tiny.model.tensor_model_parallel_size * tiny.model.pipeline_model_parallel_size <= 2


def test_defaults_and_required_keys():
    c = parse_config(REQUIRED)
    assert c.loss.type == "infifpo" and c.trainer.step0_parity_check and c.pack_length == 2 * c.data.max_length
    with pytest.raises(ConfigError, match=r"mandatory config key 'data' is not set"):
        parse_config({"model": {"path": "/m"}, "output_dir": "/o"})
    with pytest.raises(ConfigError, match=r"not set: data\.path, model\.path"):
        parse_config(OmegaConf.create({"model": {"path": "???"}, "data": {"path": "???"}, "output_dir": "/o"}))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"loss": {"type": "kto"}}, r"'loss\.type' has value 'kto'; allowed values: 'infifpo', 'dpo', 'ipo', 'sft'"),
        ({"loss": {"fusion": "max"}}, r"'loss\.fusion' has value 'max'; allowed values: 'max_margin', 'mean', 'confidence'"),
        ({"loss": {"betta": 1.0}}, r"unknown config key 'loss\.betta' \(did you mean 'loss\.beta'\?\); allowed keys in section 'loss'"),
        ({"trainer": {"step0_parity_tol": 1.0}}, r"unknown config key 'trainer\.step0_parity_tol'"),
        ({"extra": 1}, r"unknown config key 'extra'; allowed keys in the top level"),
        ({"loss": {"beta": 0}}, r"'loss\.beta' must be > 0"),
        ({"loss": {"beta": "high"}}, r"'loss\.beta' must be a number, got str"),
        ({"loss": {"clip": "yes"}}, r"'loss\.clip' must be true or false"),
        ({"model": {"micro_batch_size": 3, "global_batch_size": 8}}, r"'model\.global_batch_size' \(8\) must be a multiple of model\.micro_batch_size \(3\)"),
        ({"model": {"tensor_model_parallel_size": 1.5}}, r"'model\.tensor_model_parallel_size' must be an integer"),
        ({"model": {"precision": "fp16"}}, r"'model\.precision' has value 'fp16'; allowed values: 'bf16', 'fp32'"),
        ({"model": {"sequence_parallel": True}}, r"'model\.sequence_parallel' needs model\.tensor_model_parallel_size > 1"),
        ({"optim": {"min_lr": 1.0}}, r"'optim\.min_lr' must be in \[0, optim\.lr"),
        ({"optim": {"warmup_fraction": 1.0}}, r"'optim\.warmup_fraction' must be in \[0, 1\)"),
        ({"trainer": {"max_steps": 0}}, r"'trainer\.max_steps' must be -1 or >= 1"),
        ({"data": {"pack_length": 100}}, r"'data\.pack_length' \(100\) must be >= 2 \* data\.max_length"),
        ({"checkpoint": {"keep_last": 0}}, r"'checkpoint\.keep_last' must be >= 1"),
        ({"model": 3}, r"'model' must be a section"),
    ],
)
def test_bad_values_name_the_key(override, message):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in REQUIRED.items()}
    for section, values in override.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_loss_types_are_the_documented_ones():
    assert LOSS_TYPES == ("infifpo", "dpo", "ipo", "sft")


def test_recipe_rejects_bad_config_before_building_anything(tmp_path):
    recipe = REPO / "recipes" / "train_infifpo.py"
    base = [sys.executable, str(recipe), "--config-name", "infifpo_tiny", "model.path=/nonexistent",
            "data.path=/nonexistent", f"output_dir={tmp_path / 'run'}"]
    bad_value = subprocess.run(base + ["loss.type=kto"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad_value.returncode == 2
    assert "'loss.type' has value 'kto'; allowed values" in bad_value.stderr
    unknown = subprocess.run(base + ["+loss.betta=1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert unknown.returncode == 2 and "unknown config key 'loss.betta'" in unknown.stderr
    # Hydra itself refuses to override a key that does not exist, naming it.
    typo = subprocess.run(base + ["loss.betta=1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert typo.returncode != 0 and "loss.betta" in typo.stderr
    assert not (tmp_path / "run").exists()
