"""THOR as the paper trains it: a drawn expert pair per layer and batch, two passes, CE + symmetric KL between the
two output distributions."""

import math

import pytest
import torch
from torch import nn

from moekit import MoE
from moekit.core.catalog.thor import ThorRouter, symmetric_kl, thor_loss
from moekit.errors import ConfigError


def test_symmetric_kl_on_a_hand_computed_case():
    p1, p2 = [0.5, 0.5], [0.9, 0.1]
    kl12 = sum(a * math.log(a / b) for a, b in zip(p1, p2, strict=True))
    kl21 = sum(b * math.log(b / a) for a, b in zip(p1, p2, strict=True))
    got = symmetric_kl(torch.tensor([p1]).log(), torch.tensor([p2]).log())
    assert got.item() == pytest.approx((kl12 + kl21) / 2, rel=1e-6)
    assert symmetric_kl(torch.tensor([p1]).log(), torch.tensor([p1]).log()).item() == pytest.approx(0, abs=1e-7)


class Net(nn.Module):
    def __init__(self, dim=8, classes=3, layers=2, experts=4):
        super().__init__()
        self.moes = nn.ModuleList(MoE(dim, 16, experts, k=1, router="thor") for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        for moe in self.moes:
            x = x + moe(x).hidden
        return self.head(x)


def test_each_pass_sends_every_token_to_its_member_of_a_distinct_pair():
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    counts = []
    net.moes[0].register_forward_hook(lambda *args: counts.append(args[2].expert_counts.clone()))
    loss, parts = thor_loss(net, lambda: net(x), y, alpha=0.5)
    pair = net.moes[0].router.pair.tolist()
    assert pair[0] != pair[1]
    assert counts[0][pair[0]] == 10 and counts[0].sum() == 10
    assert counts[1][pair[1]] == 10 and counts[1].sum() == 10
    # the loss is CE averaged over the two passes plus alpha times the symmetric KL of the two outputs
    outs = []
    for member in (0, 1):
        for m in net.moes:
            m.router.use(member)
        outs.append(net(x))
    ce = (nn.functional.cross_entropy(outs[0], y) + nn.functional.cross_entropy(outs[1], y)) / 2
    torch.testing.assert_close(loss, ce + 0.5 * symmetric_kl(outs[0], outs[1]))
    torch.testing.assert_close(parts["consistency"], symmetric_kl(outs[0], outs[1]))


def test_consistency_training_makes_the_experts_agree():
    """With alpha > 0 the two sampled sub-models end closer (smaller symmetric KL on held-out inputs) than with
    alpha = 0; the mechanism, not the plumbing, is what moves the number."""
    def train(alpha):
        torch.manual_seed(1)
        net = Net(experts=4)
        teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        x = torch.randn(256, 8)
        with torch.no_grad():
            y = teacher(x).argmax(-1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for step in range(150):
            batch = torch.arange(step * 32, step * 32 + 32) % 256
            loss, _ = thor_loss(net, lambda b=batch: net(x[b]), y[batch], alpha=alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x_test = torch.randn(512, 8)
        net.train()
        kls = []
        with torch.no_grad():
            for a in range(4):
                for b in range(a + 1, 4):
                    outs = []
                    for e in (a, b):
                        for m in net.moes:
                            m.router.pair = torch.tensor([e, e])
                        outs.append(net(x_test))
                    kls.append(symmetric_kl(*outs))
        return torch.stack(kls).mean().item()

    with_kl, without = train(2.0), train(0.0)
    assert with_kl < 0.3 * without, (with_kl, without)


def test_inference_mean_averages_every_expert_and_bad_options():
    torch.manual_seed(2)
    moe = MoE(8, 16, 3, k=1, router="thor", router_options={"inference": "mean"}).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        got = moe(x).hidden
        each = []
        for e in range(3):
            moe.router.train()
            moe.router.pair = torch.tensor([e, e])
            each.append(moe(x).hidden)
    torch.testing.assert_close(got, torch.stack(each).mean(0), atol=1e-6, rtol=1e-5)
    assert isinstance(moe.router, ThorRouter)
    with pytest.raises(ConfigError, match="num_experts"):
        MoE(8, 16, 1, k=1, router="thor")
    with pytest.raises(ConfigError, match="inference"):
        MoE(8, 16, 2, k=1, router="thor", router_options={"inference": "vote"})
    with pytest.raises(ConfigError, match="pair"):
        MoE(8, 16, 2, k=1, router="thor", router_options={"pair": "same"})


def test_independent_pairs_can_coincide_distinct_ones_never_do():
    g = torch.Generator().manual_seed(0)
    independent = MoE(8, 16, 3, k=1, router="thor", router_options={"pair": "independent"}).router
    distinct = MoE(8, 16, 3, k=1, router="thor").router
    same = sum(int(p[0] == p[1]) for p in (independent.draw_pair(g).tolist() for _ in range(300)))
    assert 60 < same < 140  # about 1 / 3 of 300
    assert all(p[0] != p[1] for p in (distinct.draw_pair(g).tolist() for _ in range(300)))
    with pytest.raises(ConfigError, match="alpha"):
        thor_loss(nn.Linear(2, 2), lambda: torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), alpha=-1)
    with pytest.raises(ConfigError, match="router='thor'"):
        thor_loss(nn.Linear(2, 2), lambda: torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
