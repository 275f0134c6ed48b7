"""Routing statistics on toy models with planted structure: every expected number is derived from the planting."""

from __future__ import annotations

import math

import pytest
import torch
from inspect_toy import WordTokenizer, docs_of, planted_lm

from moekit.inspect import stats, trace

TOK = WordTokenizer()


def _p_chosen(E: int, big: float = 10.0) -> float:
    """Router probability of the chosen expert when the logits are [big, 0, ..., 0]."""
    return math.exp(big) / (math.exp(big) + E - 1)


def test_token_set_to_expert_zero_token_specialisation_and_exact_load():
    # tokens 0..4 always go to expert 0; tokens 5..19 go to experts 1, 2, 3 in turn
    first = [0] * 5 + [1 + (t % 3) for t in range(15)]
    model = planted_lm(first, num_experts=4)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 20, (600,), generator=g).tolist()
    t = trace(model, docs_of(seq), TOK, seq_len=100, progress=False)
    expected = torch.bincount(torch.tensor(first)[torch.tensor(seq)], minlength=4).double() / 600
    assert torch.allclose(stats.load(t, 0), expected)
    assert stats.load(t, 0).sum().item() == pytest.approx(1.0)
    assert stats.token_specialization(t, 0) == pytest.approx(1.0)
    assert stats.token_specialization_baseline(t, 0) < 0.2
    top = stats.top_tokens(t, 0, n=5)
    assert {d["token_id"] for d in top[0]} == {0, 1, 2, 3, 4}
    assert all(d["share"] == 1.0 for d in top[0])
    cv = stats.balance(t, 0)
    assert cv["cv"] == pytest.approx(float(expected.std(unbiased=False) / 0.25))
    assert cv["max_over_mean"] == pytest.approx(float(expected.max() / 0.25))


def test_domains_to_disjoint_experts_and_tcess():
    first = [0, 1, 0, 1, 2, 3, 2, 3]  # domain a uses tokens 0..3 (experts 0, 1); b uses 4..7 (experts 2, 3)
    model = planted_lm(first, num_experts=4)
    docs = docs_of([0, 1, 2, 0, 0, 3], [1, 2], domain="a") + docs_of([4, 5, 6, 7, 7, 7], domain="b")
    t = trace(model, docs, TOK, progress=False)
    share = stats.domain_share(t, 0)
    assert share["a"] == pytest.approx([5 / 8, 3 / 8, 0, 0])
    assert share["b"] == pytest.approx([0, 0, 2 / 6, 4 / 6])
    assert stats.domain_specialization(t, 0) == pytest.approx(1.0)
    p = _p_chosen(4)
    assert stats.tcess(t, 0, "a").tolist() == pytest.approx([5 / 8 * p, 3 / 8 * p, 0, 0])
    assert stats.tcess(t, 0, "b").tolist() == pytest.approx([0, 0, 2 / 6 * p, 4 / 6 * p])
    assert stats.tcess(t, 0).tolist() == pytest.approx([5 / 14 * p, 3 / 14 * p, 2 / 14 * p, 4 / 14 * p])
    with pytest.raises(Exception, match="expected one of"):
        stats.tcess(t, 0, "c")


def test_domain_specialisation_against_labels_shuffled_over_documents():
    model = planted_lm([0, 1, 2, 3], num_experts=4)
    docs = docs_of(*[[0, 1, 1]] * 10, domain="a") + docs_of(*[[2, 3, 3]] * 10, domain="b")
    t = trace(model, docs, TOK, progress=False)
    assert stats.domain_specialization(t, 0) == pytest.approx(1.0)
    assert stats.domain_specialization_baseline(t, 0) < 0.5


def test_domains_routed_alike_have_no_domain_specialisation():
    model = planted_lm([0, 1, 2, 3], num_experts=4)
    t = trace(model, docs_of([0, 1, 2, 3], domain="a") + docs_of([3, 2, 1, 0], domain="b"), TOK, progress=False)
    assert stats.domain_specialization(t, 0) == pytest.approx(0.0, abs=1e-12)


def test_dead_and_near_dead_experts():
    model = planted_lm([0, 1, 2, 4], num_experts=5)  # expert 3 never chosen; token 3 (expert 4) used once
    seq = [0, 1, 2] * 40 + [3]
    t = trace(model, docs_of(seq), TOK, progress=False)
    dead = stats.dead_experts(t, 0)
    assert dead == {"dead": [3], "near_dead": [4]}


def test_fixed_cross_layer_mapping_is_recovered():
    perm = [3, 0, 4, 1, 2]
    model = planted_lm([0, 1, 2, 3], num_experts=5, perm=perm)  # expert 4 never used at layer 0
    t = trace(model, docs_of(list(range(4)) * 10), TOK, progress=False)
    m = stats.transitions(t, 0)
    expected = torch.eye(5, dtype=torch.float64)[perm]
    expected[4] = 0.2  # no token: a uniform row
    assert torch.allclose(m, expected)
    assert torch.allclose(m.sum(dim=1), torch.ones(5, dtype=torch.float64))


def test_coactivation_counts_planted_pairs():
    # k = 2: token t goes to {first[t], second[t]}
    model = planted_lm([0, 0, 1], num_experts=3, second=[1, 2, 2], k=2)
    t = trace(model, docs_of([0, 0, 0, 1, 2, 2]), TOK, progress=False)
    c = stats.coactivation(t, 0)
    assert c.tolist() == [[4, 3, 1], [3, 5, 2], [1, 2, 3]]


def test_entropy_and_mass_coverage_of_confident_routing():
    model = planted_lm([0, 1, 2, 3], num_experts=4)
    t = trace(model, docs_of([0, 1, 2, 3, 0, 0, 0, 0]), TOK, progress=False)
    p = _p_chosen(4)
    q = (1 - p) / 3
    h = -(p * math.log(p) + 3 * q * math.log(q))
    e = stats.entropy(t, 0)
    assert e["mean"] == pytest.approx(h, rel=1e-3) and e["max"] == pytest.approx(math.log(4))
    assert sum(e["counts"]) == 8
    cov = stats.mass_coverage(t, 0)
    # load [5/8, 1/8, 1/8, 1/8]: one expert carries 50%, all four are needed for 90%
    assert cov == {"load_50": 1, "token_50": 1.0, "load_90": 4, "token_90": 1.0}


def test_capacity_drops_fall_at_the_end_of_each_window():
    model = planted_lm([0, 1], num_experts=4)  # every token 0 goes to expert 0
    t = trace(model, docs_of([0] * 16), TOK, seq_len=8, progress=False)
    pe = stats.position_effects(t, 0, bins=4, capacity_factor=1.0)
    # capacity ceil(1.0 * 8 * 1 / 4) = 2 per window: positions 0, 1 kept, 2..7 dropped
    assert pe["drop_rate"] == [0.0, 1.0, 1.0, 1.0]
    assert pe["tokens"] == [4, 4, 4, 4]
    assert pe["load"][0] == [1.0, 0.0, 0.0, 0.0]
    pe2 = stats.position_effects(t, 0, bins=4, capacity_factor=2.0)  # capacity 4: positions 0..3 kept
    assert pe2["drop_rate"] == [0.0, 0.0, 1.0, 1.0]


def test_counts_in_chunks_equal_counts_in_one_go(monkeypatch):
    from moekit.inspect.stats import routing

    model = planted_lm([0, 1, 2, 0, 2], num_experts=3, second=[1, 2, 0, 2, 1], perm=[2, 0, 1], k=2)
    t = trace(model, docs_of([0, 1, 2, 3, 4, 4, 3, 1] * 5), TOK, progress=False)
    whole = (stats.coactivation(t, 0), stats.transitions(t, 0))
    a = stats.membership(t, 0)
    assert torch.equal(whole[0], (a.t() @ a).round().long())
    monkeypatch.setattr(routing, "CHUNK", 7)
    assert torch.equal(stats.coactivation(t, 0), whole[0])
    assert torch.allclose(stats.transitions(t, 0), whole[1])


def test_variable_number_of_experts_masks_padded_slots():
    from inspect_toy import ToyLM

    from moekit import MoE

    # token 0 -> expert 0 alone (p ~ 1); token 1 -> experts 1 and 2 (p = 0.37 each, mass 0.5 needs both)
    embed = torch.tensor([[10.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    moe = MoE(4, 8, 4, k=2, router="top_p", router_options={"p": 0.5, "max_k": 2}, dispatch="loop")
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    t = trace(ToyLM(embed, [moe]).eval(), docs_of([0, 1, 0, 0, 1]), TOK, progress=False)
    mask = t.mask(0)
    assert mask is not None and mask.sum(dim=1).tolist() == [1, 2, 1, 1, 2]
    assert stats.counts(t, 0).tolist() == [3, 2, 2, 0]
    assert stats.load(t, 0).tolist() == pytest.approx([3 / 7, 2 / 7, 2 / 7, 0])
    assert stats.coactivation(t, 0).tolist() == [[3, 0, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
