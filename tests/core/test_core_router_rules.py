"""The routing rules of the catalog on hand-built logits: exact selections, and losses against hand-computed values."""

import math

import pytest
import torch

from moekit import MoE
from moekit.core.catalog.expert_choice import expert_choice_routing
from moekit.core.catalog.film import calibrated_logits
from moekit.core.catalog.fixed import hash_routing, scheduled_k
from moekit.core.catalog.null_experts import null_bucket_balance_loss, null_expert_routing
from moekit.core.catalog.sinkhorn import sinkhorn_plan, sinkhorn_routing
from moekit.core.catalog.top_p import router_entropy, top_p_routing
from moekit.errors import ConfigError
from reference import ref_expert_choice, ref_null_experts, ref_top_p


def selection(routing):
    """Per token {expert: weight} over the real slots."""
    mask = routing.slot_mask()
    return [{int(routing.indices[t, j]): float(routing.weights[t, j]) for j in range(routing.k) if mask[t, j]}
            for t in range(routing.num_tokens)]


def assert_same(got, want):
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want, strict=True):
        for e in g:
            assert g[e] == pytest.approx(w[e], abs=1e-6)


def log_probs(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_top_p_keeps_the_fewest_experts_reaching_p():
    logits = log_probs([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.05, 0.15, 0.3, 0.5]])
    r = top_p_routing(logits, 0.6)
    assert_same(selection(r), [{0: 0.5, 1: 0.3}, {0: 0.25, 1: 0.25, 2: 0.25}, {3: 0.5, 2: 0.3}])
    assert r.k == 3 and r.experts_per_token().tolist() == [2, 3, 2]
    assert_same(selection(top_p_routing(logits, 0.4)), [{0: 0.5}, {0: 0.25, 1: 0.25}, {3: 0.5}])
    assert_same(selection(top_p_routing(logits, 0.99, max_k=2)), [{0: 0.5, 1: 0.3}, {0: 0.25, 1: 0.25},
                                                                  {3: 0.5, 2: 0.3}])
    g = torch.Generator().manual_seed(0)
    random_logits = torch.randn(20, 7, generator=g, dtype=torch.float64) * 2
    assert_same(selection(top_p_routing(random_logits, 0.7)), ref_top_p(random_logits, 0.7))


def test_top_p_entropy_loss_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    h0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.15 * math.log(0.15) + 0.05 * math.log(0.05))
    assert float(router_entropy(probs)) == pytest.approx((h0 + math.log(4)) / 2)
    moe = MoE(8, 4, 4, router="top_p", router_options={"entropy_weight": 0.5})
    out = moe(torch.randn(5, 8))
    want = moe.loss_weights.balance * out.losses["balance"] + 0.5 * out.losses["entropy"]
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(out.losses["entropy"], router_entropy(out.routing.probs))


def test_null_experts_rule_and_bucket_balance_loss_by_hand():
    # experts 0, 1 real; 2, 3 null; k = 2
    probs = [[0.4, 0.1, 0.3, 0.2], [0.1, 0.35, 0.3, 0.25], [0.45, 0.35, 0.1, 0.1], [0.05, 0.05, 0.5, 0.4]]
    r = null_expert_routing(log_probs(probs), 2, num_real=2)
    assert_same(selection(r), [{0: 1.0}, {1: 1.0}, {0: 0.45 / 0.8, 1: 0.35 / 0.8}, {}])
    assert r.experts_per_token().tolist() == [1, 1, 2, 0]  # real experts per token
    # f = [2, 2, 3, 1] / 4 over all four; P = column means [0.25, 0.2125, 0.3, 0.2375]
    # L = 4 * (0.5 * 0.25 + 0.5 * 0.2125 + (0.75 + 0.25) * (0.3 + 0.2375) / 2) = 2.0
    loss = null_bucket_balance_loss(r.aux["all_probs"], r.aux["all_indices"], 2)
    assert float(loss) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(15, 9, generator=g, dtype=torch.float64)
    assert_same(selection(null_expert_routing(logits, 3, 5)), ref_null_experts(logits, 3, 5))


def test_null_experts_layer_uses_the_bucket_loss_and_a_wider_router():
    moe = MoE(8, 4, 4, k=2, router="null_experts", router_options={"num_null": 3})
    assert moe.router.weight.shape == (7, 8)
    out = moe(torch.randn(10, 8))
    r = out.routing
    want = null_bucket_balance_loss(r.aux["all_probs"], r.aux["all_indices"], 4)
    torch.testing.assert_close(out.losses["balance"], want)
    assert int(out.expert_counts.sum()) == int(r.experts_per_token().sum())


def test_expert_choice_tokens_get_zero_or_many_experts():
    probs = [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.2, 0.1, 0.7]]
    r = expert_choice_routing(log_probs(probs), k=1, capacity_factor=1.0)  # c = ceil(3 * 1 / 3) = 1
    assert_same(selection(r), [{0: 0.5, 1: 0.4}, {}, {2: 0.7}])
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 4, generator=g, dtype=torch.float64)
    r = expert_choice_routing(logits, k=2, capacity_factor=1.25)  # c = ceil(1.25 * 16 * 2 / 4) = 10
    assert r.counts().tolist() == [10, 10, 10, 10]  # perfectly even load
    assert_same(selection(r), ref_expert_choice(logits, 10))


def test_hash_routing_by_token_id():
    ids = torch.tensor([0, 1, 5, 1])

    def h(i, seed):
        return (i * 2654435761 + seed) % 2**32

    for seed in (0, 7):
        r = hash_routing(ids, 4, 2, seed)
        want = [[(h(i, seed) + j) % 4 for j in range(2)] for i in ids.tolist()]
        assert r.indices.tolist() == want
        assert torch.all(r.weights == 0.5)
    moe = MoE(8, 4, 4, k=2, router="hash")
    assert not any(n.startswith("router") for n, _ in moe.named_parameters())
    with pytest.raises(ConfigError, match="token_ids"):
        moe(torch.randn(4, 8))
    out = moe(torch.randn(2, 2, 8), token_ids=ids.view(2, 2))
    assert out.routing.indices.tolist() == hash_routing(ids, 4, 2).indices.tolist()
    assert "balance" not in out.losses


def test_sinkhorn_balances_and_caps():
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    assert torch.softmax(logits, -1).argmax(-1).tolist() == [0, 0, 0, 0]  # plain top-1 sends all to expert 0
    r = sinkhorn_routing(logits, 1, iterations=50, temperature=1.0, capacity_factor=1.0)
    assert r.indices[:, 0].tolist() == [0, 0, 1, 1] and r.mask.all()
    assert torch.allclose(r.weights, torch.ones(4, 1))
    capped = sinkhorn_routing(logits, 1, iterations=50, temperature=1.0, capacity_factor=0.5)  # c = 1
    assert capped.indices[:, 0].tolist() == [0, 0, 1, 1]
    assert capped.mask[:, 0].tolist() == [True, False, False, True]  # each expert keeps its best-matched token
    assert capped.weights[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 4, generator=g) * 3
    pi = sinkhorn_plan(logits, 2, iterations=200, temperature=1.0).exp()
    torch.testing.assert_close(pi.sum(1), torch.full((12,), 2.0))
    torch.testing.assert_close(pi.sum(0), torch.full((4,), 12 * 2 / 4), atol=1e-3, rtol=1e-3)
    r = sinkhorn_routing(logits, 2, iterations=8, temperature=1.0, capacity_factor=1.0)
    assert int(r.counts().max()) <= 6


def test_smoe_dropout_schedule_and_uncertainty_calibration():
    assert [scheduled_k(s, 100, 1, 8) for s in (0, 50, 100, 200)] == [1, 4, 8, 8]  # round(1 + 7 * 0.5) = 4
    heads = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # two heads, one token: mean [2, 0], variance [1, 0]
    want = torch.tensor([[2.0 / math.sqrt(1 + math.pi / 8), 0.0]])
    torch.testing.assert_close(calibrated_logits(heads), want)


@pytest.mark.parametrize(("name", "options", "field"), [
    ("top_p", {"p": 0.0}, "p"), ("top_p", {"max_k": 9}, "max_k"), ("null_experts", {"num_null": 0}, "num_null"),
    ("expert_choice", {"capacity_factor": 0}, "capacity_factor"), ("smoe_dropout", {"k_start": 5}, "k_start"),
    ("sinkhorn", {"iterations": 0}, "iterations"), ("recurrent", {"state_size": 0}, "state_size"),
    ("chain", {"iterations": 0}, "iterations"), ("film", {"heads": 0}, "heads"),
    ("random", {"inference": "vote"}, "inference"),
])
def test_bad_router_options_name_the_field(name, options, field):
    with pytest.raises(ConfigError, match=field):
        MoE(8, 4, 4, k=2, router=name, router_options=options)
