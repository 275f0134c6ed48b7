"""`accelerate` on compressed models: blocks whose experts are moekit's own modules (ragged widths after HEAPr,
quantized experts) keep computing their own way; the other blocks are accelerated; logits stay the same."""

from __future__ import annotations

import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.core.experts.ragged import RaggedExperts

IDS = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_quantized_model_accelerates_and_restores():
    model = tiny_model("qwen3_moe")
    apply_quant(model, plan_quant(model, None, "int4"))
    want = _logits(model)
    mh.accelerate(model)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    mh.restore(model)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_ragged_layer_is_left_alone_and_the_others_are_accelerated():
    model = tiny_model("mixtral")
    views = mh.view(model)
    first = views[0].experts
    widths = [first.intermediate_size - e for e in range(first.num_experts)]  # expert e loses its last e neurons
    ragged = RaggedExperts(widths, first.hidden_size, first.module.act_fn)
    size = first.intermediate_size
    gu, down = first.gate_up_proj.detach(), first.down_proj.detach()
    ragged.pack([gu[e, :w] for e, w in enumerate(widths)], [gu[e, size:size + w] for e, w in enumerate(widths)],
                [down[e, :, :w] for e, w in enumerate(widths)])
    setattr(views[0].block, views[0].family.experts, ragged)
    want = _logits(model)
    mh.accelerate(model)
    assert "forward" not in ragged.__dict__ and mh.is_accelerated(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_zero_weight_assignments_are_not_computed(monkeypatch):
    """After `reroute` skips experts, tokens that keep fewer experts than others carry padded slots of weight 0:
    the accelerated forward runs exactly the kept assignments and gives transformers' output."""
    import importlib

    from moekit.hf.reroute import experts_per_token, reroute, unroute

    acc = importlib.import_module("moekit.hf.accelerate")  # the module (moekit.hf.accelerate is the function)
    model = mh.accelerate(tiny_model("qwen3_moe"))
    rows = []
    real = acc.dispatch
    monkeypatch.setattr(acc, "dispatch", lambda x, plan, *a: rows.append(plan.token.numel()) or real(x, plan, *a))
    reroute(model, skip_threshold=0.8)
    skipped = _logits(model)
    per_layer = experts_per_token(model)
    assert 1 < sum(per_layer) / len(per_layer) < 2  # some tokens keep one expert, some two
    assert sum(rows) == round(sum(per_layer) * IDS.numel())
    mh.restore(model)
    torch.testing.assert_close(_logits(model), skipped, rtol=1e-5, atol=1e-5)  # transformers' own path agrees
    unroute(model)
