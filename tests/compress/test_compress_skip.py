"""Dynamic skipping: thresholds cut the planted fraction of second-and-later experts, the applied rule equals a
token-by-token reference, experts per token are counted, and skipped experts of a quantized model are not run."""

from __future__ import annotations

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.qformat import QuantizedMatrix
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.compress.skip import (
    apply_skip,
    calibrate_skip,
    experts_per_token,
    quantile_threshold,
    skip_mask,
    weight_ratios,
)
from moekit.data import TextDoc
from moekit.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharTokenizer:
    """Characters as ids 3..96 (the tiny models' vocabulary of 97), EOS 2."""

    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # noqa: ARG002
        return [3 + ord(c) % 94 for c in text]


DOCS = [TextDoc("the quick brown fox jumps over the lazy dog " * 6, "prose", "a"),
        TextDoc("def f(x):\n    return x * 2 + 1\n" * 8, "code", "b")]


def _ref_skip(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Token by token: keep the first largest weight, zero any other under threshold * largest."""
    out = weights.clone()
    for t, row in enumerate(weights.tolist()):
        top = max(row)
        first = row.index(top)
        for j, w in enumerate(row):
            if j != first and w < threshold * top:
                out[t, j] = 0.0
    return out


def test_ratios_mask_and_quantile_on_planted_weights():
    w = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    torch.testing.assert_close(weight_ratios(w), torch.tensor([[0.5, 1 / 6], [0.6, 0.4], [1.0, 0.5]]))
    for threshold in (0.0, 0.45, 0.55, 1.0, 2.0):
        masked = w.masked_fill(skip_mask(w, threshold), 0.0)
        torch.testing.assert_close(masked, _ref_skip(w, threshold))
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


def test_applied_skipping_equals_reference_and_is_removed():
    model = tiny_model("mixtral", num_experts_per_tok=3)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids).logits
    thresholds = [0.5, 0.8]
    # reference: each router's output replaced by the token-by-token rule
    handles = [b.router.register_forward_hook(lambda _m, _i, out, t=t: (out[0], _ref_skip(out[1], t), out[2]))
               for b, t in zip(mh.view(model), thresholds, strict=True)]
    with torch.no_grad():
        expected = model(ids).logits
    for h in handles:
        h.remove()
    hooks = apply_skip(model, thresholds)
    with torch.no_grad():
        skipped = model(ids).logits
    assert torch.equal(skipped, expected) and not torch.equal(skipped, plain)
    assert all(1 <= e < 3 for e in hooks.experts_per_token())
    hooks.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)
    with pytest.raises(ConfigError, match="thresholds: 1 values for 2 MoE layers"):
        apply_skip(model, [0.5])


def test_skipped_experts_of_a_quantized_model_are_not_run(monkeypatch):
    model = tiny_model("qwen3_moe")
    apply_quant(model, plan_quant(model, None, "int8"))
    experts = mh.view(model)[0].experts.module
    runs = []
    original = QuantizedMatrix.dequantize
    monkeypatch.setattr(QuantizedMatrix, "dequantize", lambda self, dtype: runs.append(self) or original(self, dtype))
    x = torch.randn(4, 40)
    out = experts(x, torch.tensor([[1, 5]] * 4), torch.tensor([[0.7, 0.0]] * 4))
    assert {id(m) for m in runs} == {id(experts.gate_up_q[1]), id(experts.down_q[1])}
    torch.testing.assert_close(out, experts(x, torch.tensor([[1]] * 4), torch.tensor([[0.7]] * 4)))


def test_quality_budget_bounds_the_target():
    model = tiny_model("olmoe")
    k = mh.view(model)[0].k
    none = calibrate_skip(model, DOCS, CharTokenizer(), max_loss_increase=0.0)
    lots = calibrate_skip(model, DOCS, CharTokenizer(), max_loss_increase=100.0)
    assert min(experts_per_token(model, DOCS, CharTokenizer(), lots)) < 1.05
    assert experts_per_token(model, DOCS, CharTokenizer(), none) >= experts_per_token(model, DOCS, CharTokenizer(),
                                                                                      lots)
    assert max(experts_per_token(model, DOCS, CharTokenizer(), none)) <= k
    with pytest.raises(ConfigError, match="target=1.5"):
        calibrate_skip(model, DOCS, CharTokenizer(), target=1.5)
