"""Trainer-level balancing of a native DeepSeek-V3 model: load counted from the real selections, the correction
bias nudged by the sign rule, the sequence-wise loss, bf16 autocast, and the settings refused before any work."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit.hf as mh
from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.train.balance import LoadRecorder, load_stats, sequence_balance_loss
from moekit.train.trainer import RECIPES, train
from moekit.train.validate import check_recipe

DS = dict(model_type="deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
          n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
          num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4,
          q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
          max_position_embeddings=64, routed_scaling_factor=1.0, norm_topk_prob=True)
SMOKE_DS = replace(RECIPES["smoke"], name="smoke-ds", model=DS, steps=40, grad_accum=1, balance_coef=0.0, z_coef=0.0)


def skewed(model) -> None:
    """Router scores spread enough for selection to follow them, and experts 0 and 1 favoured by +0.3."""
    torch.manual_seed(1)
    for block in mh.view(model):
        with torch.no_grad():
            block.router.weight.normal_(0, DS["hidden_size"] ** -0.5)
            block.router.e_score_correction_bias[:2] = 0.3


def tiny_ds():
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**DS, "vocab_size": 50})
    return AutoModelForCausalLM.from_config(config).eval()


def test_load_stats_hand_computed():
    stats = load_stats([torch.tensor([4.0, 0.0, 2.0, 2.0])])
    assert stats["load_cv"] == [pytest.approx(2.0 ** 0.5 / 2.0)]  # deviations (2, -2, 0, 0): std sqrt(2), mean 2
    assert stats["load_min"] == [0.0] and stats["load_max"] == [2.0] and stats["dead"] == [1]


def test_recorder_counts_the_selections_the_bias_forces():
    model = tiny_ds()
    for block in mh.view(model):
        block.router.e_score_correction_bias[5:7] = 10.0  # every token must pick experts 5 and 6
    recorder = LoadRecorder(model)
    model(input_ids=torch.randint(0, 50, (3, 7)))
    for counts in recorder.counts:
        assert counts.tolist() == [0, 0, 0, 0, 0, 21, 21, 0]
    recorder.reset()
    assert all(float(c.sum()) == 0 for c in recorder.counts)
    recorder.close()
    model(input_ids=torch.randint(0, 50, (1, 4)))
    assert all(float(c.sum()) == 0 for c in recorder.counts)  # hooks removed


def test_sequence_balance_loss_hand_computed():
    """One sequence of 2 tokens, 2 experts, k=1: both tokens pick expert 0 (f = 2/(1*2) * (2, 0) = (2, 0));
    normalised sigmoid scores (0.75, 0.25) and (0.5, 0.5) average to P = (0.625, 0.375); loss = 2 * 0.625."""
    recorder = LoadRecorder.__new__(LoadRecorder)
    logit = torch.logit(torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    recorder.last = [(logit, torch.tensor([[0], [0]]))]
    # sigmoid scores (0.75, 0.25) and (0.5, 0.5) already sum to 1 per token
    assert float(sequence_balance_loss(recorder, 2, sigmoid=True)) == pytest.approx(1.25)


def test_bias_update_and_sequence_loss_balance_a_skewed_start(tmp_path):
    """Same skewed start, no switch balance loss: the sign rule on the batch load, or DeepSeek-V3's
    sequence-wise loss, brings the load CV down; with neither the router stays collapsed (last 10 steps of 40)."""
    def late_cv(records):
        return sum(sum(r["load_cv"]) / len(r["load_cv"]) for r in records[-10:]) / 10

    off = train(SMOKE_DS, tmp_path / "off", progress=False, init=skewed)
    on = train(replace(SMOKE_DS, bias_update_rate=0.01), tmp_path / "on", progress=False, init=skewed)
    seq = train(replace(SMOKE_DS, seq_balance_coef=0.1), tmp_path / "seq", progress=False, init=skewed)
    assert off[0]["load_cv"] == on[0]["load_cv"]  # the update only acts after the first step
    assert late_cv(off) > 1.2
    assert late_cv(on) < 0.75 * late_cv(off)
    assert late_cv(seq) < 0.75 * late_cv(off)
    assert all(r["seq_balance"][0] > 0 for r in seq) and "seq_balance" not in on[-1]
    assert on[-1]["bias_spread"][0] > 0.3 and "load_min" in on[-1] and "dead" in on[-1]
    saved = mh.load(tmp_path / "on" / "model")
    biases = [b.router.e_score_correction_bias for b in mh.view(saved)]
    assert all(float(b[:2].mean()) < 0.3 for b in biases)  # the favoured experts were pushed down, and saved


def test_bf16_training_matches_fp32(tmp_path):
    """bf16 autocast with fp32 master weights follows the fp32 run: every step's loss within 1% (measured:
    0.04% after 40 steps on this recipe)."""
    steps = replace(SMOKE_DS, steps=10)
    fp32 = train(steps, tmp_path / "fp32", progress=False)
    bf16 = train(replace(steps, dtype="bf16"), tmp_path / "bf16", progress=False)
    for a, b in zip(fp32, bf16, strict=True):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=0.01)
    assert any(a["lm_loss"] != b["lm_loss"] for a, b in zip(fp32, bf16, strict=True))  # bf16 really ran


@pytest.mark.parametrize("change, expected", [
    ({"bias_update_rate": -1.0}, "bias_update_rate=-1.0"),
    ({"bias_update_rate": float("nan")}, "bias_update_rate=nan"),
    ({"seq_balance_coef": -0.5}, "seq_balance_coef=-0.5"),
    ({"dtype": "fp8"}, "dtype='fp8'"),
    ({"model": {**DS, "n_group": 3}}, "n_group=3"),
])
def test_bad_balancing_settings_refused(change, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        check_recipe(replace(SMOKE_DS, **change))


def test_bias_update_on_a_family_without_correction_bias_refused():
    with pytest.raises(ConfigError, match="Qwen3-MoE has none"):
        check_recipe(replace(RECIPES["smoke"], bias_update_rate=0.01))


@pytest.mark.parametrize("args", [
    ["--recipe", "smoke", "--set", "bias_update_rate=-1"],
    ["--recipe", "smoke", "--set", "bias_update_rate=0.01"],
    ["--config", "CONFIG"],
])
def test_cli_refuses_before_writing(tmp_path, capsys, args):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"base": "smoke", "model": {**DS, "n_group": 3}}))
    out = tmp_path / "run"
    code = main(["train", *[str(config) if a == "CONFIG" else a for a in args], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("moekit train: error:")
    assert not out.exists()
