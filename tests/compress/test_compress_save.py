"""Compressed models saved and loaded back: the same logits as in memory; native saves (pruned or merged to one
expert count) load in plain transformers; atomic-pruned models save through the manifest and load with moekit and
with transformers' trust_remote_code."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.hf.info import describe

IDS = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(3))


def _compressed(family: str, method: str, ratio: float):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    windows = [(torch.randint(3, 97, (24,), generator=g), None) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(model, windows, grads=method == "heapr", progress=False)
    return mc.apply(copy.deepcopy(model), mc.plan(model, stats, method, ratio))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(("family", "method"), [("qwen3_moe", "frequency"), ("mixtral", "msmoe"),
                                                ("deepseek_v3", "dern"), ("gpt_oss", "submoe"),
                                                ("qwen2_moe", "tcess"), ("granitemoe", "reconstruct")])
def test_native_save_loads_in_plain_transformers(tmp_path, family, method):
    model = _compressed(family, method, 0.5)
    want = _logits(model)
    mh.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "moekit.json").exists()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert 3 in (config.get(mh.FAMILIES[family].experts_key), config.get("num_local_experts"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(plain), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(mh.load(tmp_path / "out")), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_ragged_save_loads_back_through_the_manifest(tmp_path, family):
    model = _compressed(family, "heapr", 0.3)
    want = _logits(model)
    mh.save(model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "moekit.json").read_text())
    assert any("widths" in spec for spec in manifest["layers"].values())
    torch.testing.assert_close(_logits(mh.load(tmp_path / "out")), want, rtol=1e-5, atol=1e-5)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote), want, rtol=1e-5, atol=1e-5)
    routed = sum(t.numel() for name, t in remote.state_dict().items() if ".experts." in name)
    original = sum(t.numel() for name, t in tiny_model(family).state_dict().items() if ".experts." in name)
    assert routed == pytest.approx(0.7 * original, abs=60 * 40 * 3)  # 30% of the neurons gone (60 = one per expert)
    info = describe(tmp_path / "out")
    assert info["total_params"] == sum(t.numel() for t in remote.state_dict().values())
    assert set(info["experts_per_layer"].values()) == {6}


def test_layers_pruned_to_different_counts_save_through_the_manifest(tmp_path):
    model = tiny_model("olmoe")
    p = mc.Plan("frequency", 0.5, {0: {"keep": [0, 1, 2]}, 1: {"keep": [1, 3, 4, 5]}})
    mc.apply(model, p)
    want = _logits(model)
    mh.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "moekit.json").exists()
    torch.testing.assert_close(_logits(mh.load(tmp_path / "out")), want, rtol=1e-5, atol=1e-5)
