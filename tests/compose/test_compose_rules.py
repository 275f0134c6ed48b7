"""Routing rules on hand-built logits, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.compose import rules
from moekit.compose.rules import RuleConfig
from moekit.errors import ConfigError, UnknownNameError


def logits_of(*probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given rows of probabilities."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_tsallis_entropy_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    # q = 2: 1 - (0.25 + 0.0625 + 0.0625) = 0.625
    assert rules.tsallis_entropy(p, 2.0).item() == pytest.approx(0.625)
    # q -> 1 is Shannon: 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert rules.tsallis_entropy(p, 1.0).item() == pytest.approx(1.5 * math.log(2))
    assert rules.uniform_tsallis_entropy(4, 2.0) == pytest.approx(0.75)


def test_topk_keeps_k_largest_and_renormalises():
    mix = rules.topk(logits_of([0.1, 0.5, 0.3, 0.1]), k=2)
    assert torch.allclose(mix.weights, torch.tensor([[0.0, 0.625, 0.375, 0.0]]), atol=1e-6)
    # balance: 4 * sum f_e P_e, f = [0, .5, .5, 0], P = the probabilities
    assert mix.aux["balance"].item() == pytest.approx(4 * (0.5 * 0.5 + 0.5 * 0.3), rel=1e-5)


def test_top_p_keeps_the_expert_that_crosses_p():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    mask = rules.top_p_mask(p, 0.75)
    # row 0: 0.5 (< .75) then 0.3 crosses -> {1, 2}; row 1: 0.7 < .75, then one 0.1 crosses -> {0, one of the rest}
    assert mask[0].tolist() == [False, True, True, False]
    assert mask[1, 0] and mask[1].sum() == 2
    assert rules.top_p_mask(p, 0.5)[0].tolist() == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert rules.top_p_mask(p, 0.5, min_k=3)[0].sum() == 3


def test_dynmole_switches_on_tsallis_entropy():
    peaked = [0.85, 0.05, 0.05, 0.05]  # low entropy: top-p
    flat = [0.3, 0.25, 0.25, 0.2]  # high entropy: soft over all
    q = 2.0
    h_peaked = 1 - (0.85 ** 2 + 3 * 0.05 ** 2)  # 0.27
    h_flat = 1 - (0.09 + 2 * 0.0625 + 0.04)  # 0.745
    h_max = 0.75
    threshold = 0.6  # the switch sits at 0.45: h_peaked below, h_flat above
    assert h_peaked < threshold * h_max < h_flat
    mix = rules.dynmole(logits_of(peaked, flat), q=q, threshold=threshold, top_p=0.8)
    assert torch.allclose(mix.weights[0], torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6)  # 0.85 >= 0.8 alone
    assert torch.allclose(mix.weights[1], torch.tensor(flat), atol=1e-6)  # soft: the probabilities themselves
    assert mix.aux["tsallis"].item() == pytest.approx((h_peaked + h_flat) / 2, rel=1e-5)
    # moving the threshold above the flat row's entropy routes it by top-p as well: {0, 1, 2} reach 0.7
    high = rules.dynmole(logits_of(flat), q=q, threshold=0.999, top_p=0.7)
    assert torch.allclose(high.weights[0], torch.tensor([0.3, 0.25, 0.25, 0.0]) / 0.8, atol=1e-6)


def test_hard_soft_forward_is_hard_and_gradient_is_soft():
    logits = logits_of([0.6, 0.3, 0.1]).requires_grad_(True)
    mix = rules.hard_soft(logits, k=1)
    assert mix.weights.tolist() == [[1.0, 0.0, 0.0]]
    # d weights[0, 2] / d logits is the soft probability's: p2 * (delta - p); nonzero though expert 2 is unchosen
    mix.weights[0, 2].backward()
    p = torch.tensor([0.6, 0.3, 0.1])
    expected = p[2] * (torch.tensor([0.0, 0.0, 1.0]) - p)
    assert torch.allclose(logits.grad[0], expected, atol=1e-6)


def test_specialisation_balance_loss_adds_cross_entropy_to_labels():
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    mask = torch.tensor([[True, False], [False, True]])
    balance = 2 * (0.5 * 0.4 + 0.5 * 0.6)
    assert rules.specialisation_balance_loss(p, mask).item() == pytest.approx(balance)
    labels = torch.tensor([0, -1])  # the second token has no domain label
    loss = rules.specialisation_balance_loss(p, mask, labels, weight=0.5)
    assert loss.item() == pytest.approx(balance - 0.5 * math.log(0.6), rel=1e-6)


def test_fixed_and_soft():
    logits = logits_of([0.2, 0.3, 0.5], [0.5, 0.3, 0.2])
    assert rules.fixed(logits, 1).weights.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    assert torch.allclose(rules.soft(logits).weights[1], torch.tensor([0.5, 0.3, 0.2]), atol=1e-6)


def test_self_activated_ranks_keep_largest_activations():
    h = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 0.0, 0.0, -0.2]])
    gates = rules.self_activated_ranks(h, 2)
    assert gates.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
    assert rules.self_activated_ranks(h, 4).sum() == 8  # the full budget is the plain LoRA
    with pytest.raises(ConfigError, match="rank budget 5"):
        rules.self_activated_ranks(h, 5)


def test_route_dispatches_and_checks():
    logits = logits_of([0.1, 0.5, 0.3, 0.1])
    assert torch.equal(rules.route(logits, RuleConfig("topk", k=2)).weights, rules.topk(logits, 2).weights)
    with pytest.raises(UnknownNameError, match="router 'switchy' does not exist"):
        rules.route(logits, RuleConfig("switchy"))
    with pytest.raises(ConfigError, match="k=5"):
        rules.route(logits, RuleConfig("topk", k=5))
    with pytest.raises(ConfigError, match="top_p=0"):
        rules.route(logits, RuleConfig("dynmole", top_p=0.0))
