"""Dynamic skipping: thresholds cut the planted fraction of second-and-later experts (applied through
moekit.hf.reroute, which counts experts per token), and skipped experts of a quantized model are not run."""

from __future__ import annotations

import json

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.compress.skip import apply_skip, calibrate_skip, experts_per_token, quantile_threshold, weight_ratios
from moekit.core.experts.quantized import DispatchedQuantizedExperts
from moekit.data import TextDoc
from moekit.errors import ConfigError
from moekit.hf.reroute import unroute


class CharTokenizer:
    """Characters as ids 3..96 (the tiny models' vocabulary of 97), EOS 2."""

    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # noqa: ARG002
        return [3 + ord(c) % 94 for c in text]


DOCS = [TextDoc("the quick brown fox jumps over the lazy dog " * 6, "prose", "a"),
        TextDoc("def f(x):\n    return x * 2 + 1\n" * 8, "code", "b")]


def test_ratios_and_quantile_on_planted_weights():
    w = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    torch.testing.assert_close(weight_ratios(w), torch.tensor([[0.5, 1 / 6], [0.6, 0.4], [1.0, 0.5]]))
    r = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4])
    for target in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert float((r < quantile_threshold(r, target)).float().mean()) == target


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_calibrated_thresholds_skip_the_target_fraction(model_type):
    model = tiny_model(model_type)
    k = mh.view(model)[0].k
    for target in (0.25, 0.5):
        thresholds = calibrate_skip(model, DOCS, CharTokenizer(), target=target)
        assert len(thresholds) == len(mh.view(model))
        per_token = experts_per_token(model, DOCS, CharTokenizer(), thresholds)
        for e in per_token:  # the same tokens: exactly the target share of the k - 1 later experts is dropped
            assert e == pytest.approx(k - target * (k - 1), abs=0.02)


def test_skipped_experts_of_a_quantized_model_are_not_run(monkeypatch):
    model = tiny_model("qwen3_moe")
    apply_quant(model, plan_quant(model, None, "int8"))
    top1: set[tuple[int, int]] = set()
    for b in mh.view(model):  # the expert each token ranks first, seen before any rerouting
        b.router.register_forward_hook(
            lambda _m, _i, out, layer=b.layer: top1.update((layer, int(e)) for e in out[2][:, 0]))
    runs: set[tuple[int, int]] = set()
    layer_of = {id(b.experts.module): b.layer for b in mh.view(model)}
    original = DispatchedQuantizedExperts.expert
    monkeypatch.setattr(DispatchedQuantizedExperts, "expert",
                        lambda self, x, e: runs.add((layer_of[id(self)], e)) or original(self, x, e))
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    apply_skip(model, [1.0, 1.0])  # every token keeps only its top expert
    with torch.no_grad():
        model(ids)
    assert runs == top1
    unroute(model)
    runs.clear()
    with torch.no_grad():
        model(ids)
    assert runs > top1  # without skipping, second choices run too


def test_quality_budget_bounds_the_target():
    model = tiny_model("olmoe")
    k = mh.view(model)[0].k
    none = calibrate_skip(model, DOCS, CharTokenizer(), max_loss_increase=0.0, steps=3)
    lots = calibrate_skip(model, DOCS, CharTokenizer(), max_loss_increase=100.0, steps=4)
    assert min(experts_per_token(model, DOCS, CharTokenizer(), lots)) < 1.1  # target 15/16 after 4 steps
    assert experts_per_token(model, DOCS, CharTokenizer(), none) >= experts_per_token(model, DOCS, CharTokenizer(),
                                                                                      lots)
    assert max(experts_per_token(model, DOCS, CharTokenizer(), none)) <= k
    with pytest.raises(ConfigError, match="target=1.5"):
        calibrate_skip(model, DOCS, CharTokenizer(), target=1.5)


def test_skip_file_is_read_checked_or_absent(tmp_path):
    from moekit.compress.skip import read_skip

    assert read_skip(tmp_path, 2) is None
    (tmp_path / "skip.json").write_text(json.dumps({"thresholds": [0.2, 0.3], "renormalize": False}))
    assert read_skip(tmp_path, 2) == {"thresholds": [0.2, 0.3], "renormalize": False}
    with pytest.raises(ConfigError, match=r"skip.json: 2 thresholds .* expected 4"):
        read_skip(tmp_path, 4)
    (tmp_path / "skip.json").write_text("{not json")
    with pytest.raises(ConfigError, match="skip.json: expected JSON with 'thresholds'"):
        read_skip(tmp_path, 2)
