"""`accelerate` on compressed models: blocks whose experts are moekit's own modules (ragged widths after HEAPr,
quantized experts) keep computing their own way; the other blocks are accelerated; logits stay the same."""

from __future__ import annotations

import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.hf.ragged import RaggedExperts

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
