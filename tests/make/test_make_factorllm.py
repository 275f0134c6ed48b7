"""FactorLLM's Prior-Approximate router: the prior and the PA loss by hand, and a router trained by it picks the
planted experts of an FFN whose neuron groups each fire along their own direction."""

from __future__ import annotations

import math

import pytest
import torch
from make_families import dense_model

import moekit.make as mk
from moekit.errors import ConfigError
from moekit.make.routers import expert_contributions, make_router, pa_loss, pa_prior


def test_prior_and_loss_by_hand():
    contrib = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    prior = pa_prior(contrib, tau=1.0)
    # token 0: c / mean c = [0.5, 1.5] -> softmax = [1, e] / (1 + e); token 1: equal contributions -> [1/2, 1/2]
    p0 = [1 / (1 + math.e), math.e / (1 + math.e)]
    assert torch.allclose(prior, torch.tensor([p0, [0.5, 0.5]]), atol=1e-6)
    assert torch.allclose(pa_prior(contrib, tau=0.5)[0], torch.softmax(torch.tensor([1.0, 3.0]), 0), atol=1e-6)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # q0 = [1/2, 1/2], q1 = [3/4, 1/4]
    kl0 = sum(p * math.log(p / 0.5) for p in p0)
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(pa_loss(logits, prior)) == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert float(pa_loss(torch.log(prior), prior)) == pytest.approx(0.0, abs=1e-7)  # the minimum: q = p


def test_contributions_are_the_experts_output_norms():
    g = torch.Generator().manual_seed(0)
    acts, down = torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g)
    part = torch.tensor([[0, 2, 4], [1, 3, 5]])
    c = expert_contributions(acts, part, down)
    want = (acts[:, [1, 3, 5]] @ down[:, [1, 3, 5]].t()).norm(dim=-1)
    assert torch.allclose(c[:, 1], want, atol=1e-6)
    assert torch.allclose(expert_contributions(acts, part), acts.abs()[:, part].sum(-1))


def _planted(seed: int = 0):
    """A qwen3 model whose first FFN has 4 groups of 16 neurons, each firing along its own direction, the groups
    shuffled across the neuron axis (so the partition must find them)."""
    model = dense_model("qwen3", width=64)
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T  # [4, 32] orthonormal
    owner = torch.randperm(64, generator=g) % 4
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(dirs[owner] * 3 + 0.01 * torch.randn(64, 32, generator=g))
        mlp.up_proj.weight.copy_(dirs[owner] * 3 + 0.01 * torch.randn(64, 32, generator=g))
    return model, mlp, dirs, owner


def test_trained_router_picks_the_planted_experts():
    model, mlp, dirs, owner = _planted()
    part = torch.stack([torch.nonzero(owner == j).flatten() for j in range(4)])
    g = torch.Generator().manual_seed(1)
    group = torch.randint(0, 4, (600,), generator=g)
    x = dirs[group] * 1.5 + 0.3 * torch.randn(600, 32, generator=g)
    acts = mk.activations(mlp, x)
    router = make_router("factorllm", mlp.gate_proj.weight, part, x[:400], acts[:400],
                         down=mlp.down_proj.weight.detach())
    picked = (x[400:] @ router.t()).argmax(-1)
    assert float((picked == group[400:]).float().mean()) > 0.95
    with pytest.raises(ConfigError, match="router=factorllm: needs calibration text"):
        make_router("factorllm", mlp.gate_proj.weight, part)


def test_moefy_with_the_factorllm_router():
    """Through moefy (k-means partition): the converted layer's top-1 expert holds the token's planted group."""
    model, mlp, dirs, owner = _planted()
    g = torch.Generator().manual_seed(2)
    group = torch.randint(0, 4, (300,), generator=g)
    x = dirs[group] * 1.5 + 0.3 * torch.randn(300, 32, generator=g)
    inputs = {0: x[:200], 1: x[:200]}
    moe, plan = mk.moefy(model, experts=4, k=1, partition="kmeans", router="factorllm", inputs=inputs, shared=0)
    assert plan["router"] == "factorllm"
    experts = torch.tensor(plan["layers"]["0"])  # [E, I/E] neuron ids per expert
    expert_group = torch.mode(owner[experts], dim=1).values
    gate = moe.model.layers[0].mlp.gate.weight
    picked = expert_group[(x[200:] @ gate.t()).argmax(-1)]
    assert float((picked == group[200:]).float().mean()) > 0.95
    with pytest.raises(ConfigError, match="needs calibration text"):
        mk.moefy(model, experts=4, k=1, router="factorllm", shared=0)
