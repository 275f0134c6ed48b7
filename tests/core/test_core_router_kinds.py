"""Expert kinds that are more than a routing rule, each against a computation written out by hand."""

import pytest
import torch

from moekit import MoE
from moekit.core import link_layers
from moekit.core.catalog.weak_strong import dispersion
from moekit.errors import RoutingError
from reference import ref_moe, ref_shared


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_random_trains_on_the_mean_of_two_sampled_experts_with_consistency_loss():
    torch.manual_seed(0)
    moe = MoE(8, 6, 5, k=2, router="random", router_options={"consistency_weight": 0.3}, dtype=torch.float64)
    assert not any(n.startswith("router") for n, _ in moe.named_parameters())
    x = torch.randn(40, 8, dtype=torch.float64)
    out = moe(x)
    pair = out.routing.indices
    assert pair.shape == (40, 2) and bool((pair[:, 0] != pair[:, 1]).all())
    assert len(set(pair.reshape(-1).tolist())) == 5  # every expert gets sampled
    half = torch.full((40, 2), 0.5, dtype=torch.float64)
    torch.testing.assert_close(out.hidden, ref_moe(x, pair, half, moe.experts))
    y1 = ref_moe(x, pair[:, :1], torch.ones(40, 1), moe.experts)
    y2 = ref_moe(x, pair[:, 1:], torch.ones(40, 1), moe.experts)
    torch.testing.assert_close(out.losses["consistency"], (y1 - y2).square().mean())
    torch.testing.assert_close(out.aux_loss, 0.3 * out.losses["consistency"])
    moe.eval()
    out = moe(x, k=3)
    assert out.routing.k == 3 and all(len(set(row)) == 3 for row in out.routing.indices.tolist())
    mean = MoE(8, 6, 5, router="random", router_options={"inference": "mean"}, dtype=torch.float64).eval()
    all_experts = torch.arange(5).expand(40, 5)
    torch.testing.assert_close(mean(x).hidden, ref_moe(x, all_experts, torch.full((40, 5), 0.2), mean.experts))


def test_chain_iterates_with_own_routers_and_residual():
    torch.manual_seed(1)
    moe = MoE(8, 6, 4, k=1, router="chain", router_options={"iterations": 2}, dtype=torch.float64)
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    with torch.no_grad():
        r1 = moe.router(x)
        h1 = x + ref_moe(x, r1.indices, r1.weights, moe.experts)
        r2 = moe.router.later[0](h1)
        h2 = h1 + ref_moe(h1, r2.indices, r2.weights, moe.experts)
    torch.testing.assert_close(out.hidden, h2 - x)
    assert out.routing.k == 2 and int(out.expert_counts.sum()) == 24
    (out.hidden.square().sum() + out.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.router.later[0].weight.grad.abs().sum() > 0


def test_weak_strong_mixes_by_confidence_and_skips_strong_when_confident():
    torch.manual_seed(2)
    moe = MoE(8, 6, 4, k=2, router="weak_strong", dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64)
    out = moe(x)
    with torch.no_grad():
        u = torch.stack([ref_shared(row, moe.router.weak) for row in x])
        c = torch.sigmoid(moe.router.confidence_scale * dispersion(u) + moe.router.confidence_shift)
        r = moe.router(x)
        want = c.unsqueeze(-1) * u + ref_moe(x, r.indices, r.weights * (1 - c).unsqueeze(-1), moe.experts)
    torch.testing.assert_close(out.hidden, want)
    torch.testing.assert_close(out.losses["strong_use"], (1 - c).mean())
    moe.eval()
    with torch.no_grad():
        moe.router.confidence_shift.fill_(50.0)  # every token confident: the weak expert alone, no strong expert runs
    out = moe(x)
    torch.testing.assert_close(out.hidden, u)
    assert int(out.expert_counts.sum()) == 0 and out.routing.experts_per_token().tolist() == [0] * 10
    with torch.no_grad():
        moe.router.confidence_shift.fill_(-50.0)
    assert moe(x).routing.experts_per_token().tolist() == [2] * 10


def test_small_big_skip_paths():
    torch.manual_seed(3)
    moe = MoE(8, 6, 4, k=2, router="small_big_skip", dtype=torch.float64)
    x = torch.randn(6, 8, dtype=torch.float64)
    path = moe.router.path
    for choice in range(3):
        with torch.no_grad():
            path.weight.zero_()
            path.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
            path.bias[choice] = 2.0
        out = moe(x)
        p = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2)  # softmax([2, 0, 0])[0]
        with torch.no_grad():
            if choice == 0:
                want = torch.zeros_like(x)
            elif choice == 1:
                want = p * torch.stack([ref_shared(row, moe.router.small) for row in x])
            else:
                r = moe.router(x)
                want = ref_moe(x, r.indices, r.weights * p, moe.experts)
        torch.testing.assert_close(out.hidden, want)
        assert out.routing.experts_per_token().tolist() == [2 if choice == 2 else 0] * 6
        cost = [0.0, moe.router.small_cost, 1.0]
        q = (1 - p) / 2
        want_cost = sum((p if j == choice else q) * cost[j] for j in range(3))
        torch.testing.assert_close(out.losses["compute"], torch.as_tensor(want_cost, dtype=torch.float64))
    assert moe.router.small_cost == pytest.approx(3 / (2 * 6))  # small width I/2 over the big path's k I


def test_film_experts_equal_the_per_expert_sum_with_far_fewer_parameters():
    torch.manual_seed(4)
    moe = MoE(8, 6, 4, k=2, router="film", dtype=torch.float64)
    with torch.no_grad():
        moe.experts.gamma.uniform_(0.5, 1.5)
        moe.experts.beta.normal_()
    x = torch.randn(9, 8, dtype=torch.float64)
    out = moe(x)
    r = out.routing
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            want[t] += r.weights[t, j] * moe.experts.expert(x[t:t + 1], int(r.indices[t, j]))[0]
    torch.testing.assert_close(out.hidden, want.detach())
    plain = MoE(8, 6, 4, k=2)
    assert sum(p.numel() for p in moe.experts.parameters()) < sum(p.numel() for p in plain.experts.parameters()) / 2
    out.hidden.sum().backward()
    assert moe.experts.gamma.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_recurrent_router_carries_a_gru_state_across_linked_layers():
    torch.manual_seed(5)
    moes = [MoE(8, 6, 4, k=2, router="recurrent", router_options={"state_size": 5}, dtype=torch.float64)
            for _ in range(3)]
    link_layers(moes)
    x = torch.randn(7, 8, dtype=torch.float64)
    h, outs = x, []
    for moe in moes:
        outs.append(moe(h))
        h = h + outs[-1].hidden
    with torch.no_grad():
        state = torch.zeros(7, 5, dtype=torch.float64)
        h = x
        for moe, out in zip(moes, outs, strict=True):
            state = moe.router.gru(moe.router.proj(h), state)
            torch.testing.assert_close(out.routing.logits, state @ moe.router.weight.t())
            h = h + out.hidden
    outs[2].hidden.square().sum().backward()
    assert moes[0].router.gru.weight_ih.grad.abs().sum() > 0  # the top layer's loss reaches the bottom router
    with pytest.raises(RoutingError, match="layer below"):
        moes[1](torch.randn(3, 8, dtype=torch.float64))
    alone = MoE(8, 6, 4, router="recurrent", router_options={"state_size": 5}, dtype=torch.float64)
    with torch.no_grad():
        r = alone(x).routing
        state = alone.router.gru(alone.router.proj(x), torch.zeros(7, 5, dtype=torch.float64))
    torch.testing.assert_close(r.logits, state @ alone.router.weight.t())
    link_layers([MoE(8, 6, 4), alone])  # a non-recurrent layer below: fresh state
    assert alone.router.__dict__["below"] is None


def test_smoe_dropout_router_is_fixed_and_k_follows_the_schedule():
    torch.manual_seed(6)
    moe = MoE(8, 6, 8, k=2, router="smoe_dropout", router_options={"k_start": 2, "k_end": 6})
    assert "router.weight" not in dict(moe.named_parameters()) and "router.weight" in moe.state_dict()
    x = torch.randn(5, 8, requires_grad=True)
    assert moe(x).routing.k == 2
    moe.set_step(50, 100)
    out = moe(x)
    assert out.routing.k == 4
    (out.hidden.sum() + out.aux_loss).backward()
    assert x.grad.abs().sum() > 0 and "balance" not in out.losses
    moe.eval()
    assert moe(x).routing.k == 2 and moe(x, k=7).routing.k == 7
