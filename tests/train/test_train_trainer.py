"""The trainer on the `smoke` recipe (a 2-layer, 4-expert Qwen3-MoE on a small slice of the offline corpus)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moekit.errors import ConfigError, UnknownNameError
from moekit.train.trainer import RECIPES, lr_at, train


def losses(path):
    return [(r["step"], r["loss"], r["lm_loss"], r["balance"], r["z"])
            for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


def test_resume_continues_bit_for_bit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train("smoke", whole, progress=False)
    train("smoke", parts, stop_at=3, progress=False)
    assert [s for s, *_ in losses(parts)] == [1, 2, 3]
    train("smoke", parts, resume=True, progress=False)
    assert losses(parts) == losses(whole)
    a = load_file(whole / "checkpoint" / "model.safetensors")
    b = load_file(parts / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_checkpoint_and_native_model(tmp_path):
    recs = train("smoke", tmp_path / "run", progress=False)
    assert [r["step"] for r in recs] == list(range(1, RECIPES["smoke"].steps + 1))
    layers = RECIPES["smoke"].model["num_hidden_layers"]
    for r in recs:
        assert len(r["load_cv"]) == layers and len(r["router_entropy"]) == layers
        assert 0 < r["router_entropy"][0] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        # loss = lm_loss + balance_coef * balance + z_coef * z
        recipe = RECIPES["smoke"]
        assert r["loss"] == pytest.approx(r["lm_loss"] + recipe.balance_coef * r["balance"] + recipe.z_coef * r["z"],
                                          abs=1e-4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.model_type == "qwen3_moe"


def test_loss_goes_down(tmp_path):
    recs = train("smoke", tmp_path / "run", progress=False, steps=30, lr=1e-2)
    first, last = sum(r["lm_loss"] for r in recs[:3]) / 3, sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5


def test_schedule_warmup_and_cosine():
    recipe = RECIPES["smoke"]
    assert lr_at(recipe, 0) == pytest.approx(recipe.lr / recipe.warmup)
    assert lr_at(recipe, recipe.warmup - 1) == pytest.approx(recipe.lr)
    assert lr_at(recipe, recipe.steps) == pytest.approx(recipe.lr * recipe.min_lr_ratio)


def test_bad_input(tmp_path):
    with pytest.raises(UnknownNameError, match="recipe='huge'.*smoke"):
        train("huge", tmp_path / "x", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        train("smoke", tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="checkpoint/state.json"):
        train("smoke", tmp_path / "nothing", resume=True, progress=False)
    train("smoke", tmp_path / "run", stop_at=1, progress=False)
    with pytest.raises(ConfigError, match="recipe 'smoke' with other settings"):
        train("smoke", tmp_path / "run", resume=True, progress=False, lr=0.5)


def test_cli_train_and_errors(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moekit.cli.main", "train", "--recipe", "smoke", "--out", str(tmp_path / "run"),
           "--stop-at", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 2: loss" in proc.stdout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # same --out again, no --resume
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("moekit train: error:") and "not empty" in proc.stderr
    proc = subprocess.run(cmd[:5] + ["nope"] + cmd[6:], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "recipe='nope'" in proc.stderr
    new_out = tmp_path / "never"
    proc = subprocess.run(cmd[:6] + ["--out", str(new_out), "--prose-dir", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not new_out.exists()  # nothing written for a run that could not start


def test_dense_recipe_trains_and_saves(tmp_path):
    recs = train("tiny-dense", tmp_path / "dense", progress=False, steps=2, warmup=1, vocab_size=300, seq_len=32,
                 batch_size=2, max_docs_per_domain=10)
    assert all(r["balance"] == 0 and r["load_cv"] == [] for r in recs)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "model")
    # the dense twin: DeepSeek-V3 with every layer dense, the MLP as wide as the routed experts plus the shared one
    cfg = model.config
    assert cfg.model_type == "deepseek_v3" and cfg.first_k_dense_replace == cfg.num_hidden_layers
    assert cfg.intermediate_size == (6 + 1) * 64
    assert not any(hasattr(layer.mlp, "experts") for layer in model.model.layers)
