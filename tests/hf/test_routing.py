"""reference_routing: every family's router reproduced with moekit's pure rules, on the model's own tensors."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_model

import moekit.hf as mh
from moekit.errors import ConfigError
from moekit.hf.routing import reference_routing

CASES = [(t, {}) for t in FAMILY_TYPES] + [
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3}),
    ("phimoe", {"router_jitter_noise": 0.5}),
    ("gpt_oss", {"num_experts_per_tok": 6}),
    ("mixtral", {"num_experts_per_tok": 1}),
]


def _by_expert(weights, indices):
    """[T, k] slots sorted by expert id, so unsorted top-k (DeepSeek) compares with sorted."""
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize(("model_type", "overrides"), CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_reference_routing_equals_the_familys_router(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    for block in mh.view(model):
        logits, weights, indices = block.router(x)
        ref = reference_routing(block, x)
        torch.testing.assert_close(ref.logits.float(), logits.float(), atol=1e-6, rtol=0)
        ref_w, ref_i = _by_expert(ref.weights, ref.indices)
        hf_w, hf_i = _by_expert(weights, indices)
        assert torch.equal(ref_i, hf_i)
        torch.testing.assert_close(ref_w.float(), hf_w.float(), atol=1e-6, rtol=1e-6)


def test_sparsemixer_threshold_keeps_near_ties():
    """Experts within the relative margin share slot 1's softmax; a large jitter_eps lets more in."""
    from moekit.hf.routing import sparsemixer_eval

    logits = torch.tensor([[2.0, 1.9, -3.0, 0.0]])
    tight = sparsemixer_eval(logits, jitter_eps=0.01)
    assert tight.indices.tolist() == [[0, 1]] and torch.allclose(tight.weights, torch.ones(1, 2))
    loose = sparsemixer_eval(logits, jitter_eps=0.1)  # (2.0 - 1.9) / 2.0 = 0.05 <= 0.2: expert 1 competes
    expected = torch.softmax(torch.tensor([2.0, 1.9]), 0)[0]
    torch.testing.assert_close(loose.weights[0, 0], expected)


def test_sparsemixer_refuses_training_mode():
    model = tiny_model("phimoe").train()
    with pytest.raises(ConfigError, match="training mode"):
        reference_routing(mh.view(model)[0], torch.randn(3, 40))
