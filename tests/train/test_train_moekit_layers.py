"""The trainer with moekit's own MoE layers (Recipe.moe_layer): losses, balancing on a skewed start, load_run."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.core.layer import MoE
from moekit.errors import ConfigError
from moekit.train.moe_model import MoEBlock, moe_blocks
from moekit.train.trainer import RECIPES, load_run, train


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_moekit_layers_train_and_load_back(tmp_path):
    recs = train("smoke", tmp_path / "run", progress=False, moe_layer={"router": "topk"})
    recipe = RECIPES["smoke"]
    for r in recs:
        # the layer-mean aux loss is balance_coef * balance + z_coef * z
        assert r["loss"] == pytest.approx(r["lm_loss"] + recipe.balance_coef * r["balance"] + recipe.z_coef * r["z"],
                                          abs=1e-4)
        assert r["experts_per_token"] == [2.0] * recipe.model["num_hidden_layers"]
        assert r["balance"] >= 1.0 - 1e-4  # the switch loss is at least 1, reached only at perfect balance
    model = load_run(tmp_path / "run")
    blocks = moe_blocks(model)
    assert len(blocks) == recipe.model["num_hidden_layers"] and all(isinstance(b.moe, MoE) for b in blocks)
    # the saved weights are the last checkpoint's
    from safetensors.torch import load_file

    ckpt = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, ckpt[name], rtol=0, atol=0)


def _skew_bias(model):
    """Every token starts on experts 0 and 1 of every layer (router bias +4 on them)."""
    for b in moe_blocks(model):
        with torch.no_grad():
            b.moe.router.bias.copy_(torch.tensor([4.0, 4.0, 0.0, 0.0]))


def _skew_correction(model):
    for b in moe_blocks(model):
        b.moe.router.e_score_correction_bias.copy_(torch.tensor([0.3, 0.3, 0.0, 0.0]))


def _cv(recs, first: bool) -> float:
    rows = recs[:1] if first else recs[-3:]
    return sum(sum(r["load_cv"]) / len(r["load_cv"]) for r in rows) / len(rows)


def test_balance_loss_evens_a_skewed_start(tmp_path):
    common = dict(progress=False, steps=40, warmup=1, lr=1e-2, z_coef=0.0, init=_skew_bias,
                  moe_layer={"router": "topk", "router_options": {"bias": True}})
    without = train("smoke", tmp_path / "off", balance_coef=0.0, **common)
    with_loss = train("smoke", tmp_path / "on", balance_coef=1.0, **common)
    assert _cv(with_loss, first=True) == pytest.approx(1.0, abs=1e-6)  # two of four experts take everything
    assert _cv(with_loss, first=False) < 0.5
    assert _cv(with_loss, first=False) < _cv(without, first=False) - 0.2


def test_bias_update_evens_a_skewed_start_without_aux_loss(tmp_path):
    # no aux loss at all: without the bias update the router collapses onto the favoured experts
    common = dict(progress=False, steps=60, warmup=1, balance_coef=0.0, z_coef=0.0, init=_skew_correction,
                  moe_layer={"router": "deepseek_v3"})
    without = train("smoke", tmp_path / "off", **common)
    updated = train("smoke", tmp_path / "on", bias_update_rate=0.02, **common)
    assert all(r["loss"] == r["lm_loss"] for r in updated)
    # after step 1 the favoured experts' biases went down by the rate and the others' up by it
    assert "bias_spread" not in without[-1] and updated[0]["bias_spread"][0] == pytest.approx(0.3 - 2 * 0.02)
    assert _cv(updated, first=True) > 0.8 and _cv(without, first=False) > 0.9
    assert _cv(updated, first=False) < 0.7
    assert _cv(updated, first=False) < _cv(without, first=False) - 0.3
    bias = load_run(tmp_path / "on").model.layers[0].mlp.moe.router.e_score_correction_bias
    assert float(bias[:2].mean() - bias[2:].mean()) < 0.3  # the update lowered the favoured experts' bias


def test_bad_moe_layer(tmp_path):
    with pytest.raises(ConfigError, match="num_experts"):
        train("smoke", tmp_path / "a", progress=False, moe_layer={"num_experts": 8})
    with pytest.raises(ConfigError, match="moe_layer"):
        train("smoke", tmp_path / "b", progress=False, moe_layer={"no_such_argument": 1})
    with pytest.raises(ConfigError, match="bias_update_rate"):
        train("smoke", tmp_path / "c", progress=False, moe_layer={}, bias_update_rate=0.1)
    assert isinstance(MoEBlock(MoE(8, 8, 2, 1)), torch.nn.Module)


def test_cli_config_file_and_set(tmp_path, capsys):
    from moekit.cli.main import main

    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"base": "smoke", "steps": 2, "moe_layer": {"router": "topk"}}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "lr=0.002"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["recipe"]["name"] == "mine" and state["recipe"]["lr"] == 0.002 and state["step"] == 2
    assert state["recipe"]["moe_layer"] == {"router": "topk"}
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": "smoke", "stepz": 2}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json: unknown field(s) stepz" in capsys.readouterr().err
    assert main(["train", "--recipe", "smoke", "--out", str(tmp_path / "y"), "--set", "nope=1"]) == 2
    assert "--set 'nope=1'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_routers_that_need_token_ids_or_a_schedule_train(tmp_path):
    """hash routes by the input ids the trainer hands each layer; smoe_dropout's k follows the step hook."""
    recs = train("smoke", tmp_path / "hash", progress=False, steps=2, moe_layer={"router": "hash"})
    assert len(recs) == 2 and all(r["loss"] > 0 for r in recs)
    recs = train("smoke", tmp_path / "drop", progress=False, steps=4, moe_layer={"router": "smoe_dropout"})
    per_token = [r["experts_per_token"][0] for r in recs]
    assert per_token == sorted(per_token) and per_token[-1] > per_token[0]  # k grows during training
