"""Super experts and expert health on models with a planted outlier expert, a collapsed expert, known shared use."""

from __future__ import annotations

import pytest
import torch
from inspect_toy import WordTokenizer, docs_of, planted_lm

from hf.tiny import FAMILY_TYPES, tiny_model
from moekit.inspect import stats, trace

TOK = WordTokenizer()


def _docs(n: int = 4, length: int = 40, vocab: int = 97, seed: int = 0, domain: str = "d"):
    g = torch.Generator().manual_seed(seed)
    return docs_of(*[torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)], domain=domain)


def test_scaled_expert_is_found_as_the_super_expert_and_ablation_matters_more():
    model = tiny_model("qwen3_moe")
    docs = _docs()
    acts0 = stats.expert_activations(model, docs, TOK, progress=False)
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.experts.down_proj[4] *= 100.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = stats.super_experts(model, docs, TOK, progress=False)
    assert [(s["layer"], s["expert"]) for s in found] == [(1, 4)]
    s = found[0]
    # the output of down_proj is linear in its weight: 100 x the unscaled maximum
    assert s["max_abs"] == pytest.approx(100 * acts0.max_abs[1][4], rel=1e-4)
    assert s["ratio"] >= 5.0 and s["ordinary_expert"] != 4
    assert abs(s["ablation_loss_delta"]) > 10 * abs(s["ordinary_loss_delta"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights restored


def test_no_super_expert_in_an_unremarkable_model():
    model = tiny_model("mixtral")
    assert stats.super_experts(model, _docs(), TOK, progress=False) == []


def test_ablation_of_an_expert_no_token_uses_changes_nothing():
    model = tiny_model("olmoe")
    docs = _docs(n=2)
    t_used = stats.expert_activations(model, docs, TOK, progress=False).tokens[0]
    unused = [e for e, n in enumerate(t_used) if n == 0]
    used = max(range(len(t_used)), key=lambda e: t_used[e])
    base, deltas = stats.ablation_loss_deltas(model, [(0, used)] + [(0, e) for e in unused], docs, TOK)
    assert base > 0 and deltas[0] != 0.0
    assert all(d == 0.0 for d in deltas[1:])


def test_collapsed_expert_and_shared_share():
    model = planted_lm([0, 1, 2, 3], num_experts=4, shared=True)
    moe0 = model.moes[0]
    with torch.no_grad():
        torch.nn.init.normal_(moe0.experts.gate_up_proj)
        moe0.experts.gate_up_proj[2, :8] = 0.0  # expert 2's gate rows: silu(0) * up = 0 everywhere
    docs = docs_of([0, 1, 2, 3] * 5, domain="a") + docs_of([2, 2, 1], domain="b")
    health = stats.expert_health(model, docs, TOK, progress=False)
    assert health["near_zero"][0][2] == 1.0
    assert health["collapsed"][0] == [2]
    # the routed experts output zero (down_proj zeroed), so the shared expert carries everything
    assert health["shared_share"] == {"a": [1.0, 1.0], "b": [1.0, 1.0]}
    with torch.no_grad():
        for moe in model.moes:
            moe.shared_experts.down_proj.weight.zero_()
            torch.nn.init.normal_(moe.experts.down_proj)
    assert stats.expert_health(model, docs, TOK, progress=False)["shared_share"] == {"a": [0.0, 0.0],
                                                                                       "b": [0.0, 0.0]}


def test_shared_share_on_a_gated_hf_shared_expert():
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.shared_expert_gate.weight.zero_()
            layer.mlp.shared_expert_gate.weight[0, 0] = -1e4  # gate closed for tokens with positive feature 0
    share = stats.expert_health(model, _docs(n=2), TOK, progress=False)["shared_share"]["d"]
    assert len(share) == 2 and all(0.0 <= s < 1.0 for s in share)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_expert_activations_on_every_family_agree_with_the_trace(model_type):
    model = tiny_model(model_type)
    docs = _docs(n=2, length=24)
    t = trace(model, docs, TOK, progress=False)
    acts = stats.expert_activations(model, docs, TOK, progress=False)
    assert acts.layers == t.layers
    for i in range(len(t.layers)):
        assert acts.tokens[i] == stats.counts(t, i).tolist()  # k distinct experts per token
        assert all((v > 0) == (n > 0) for v, n in zip(acts.max_abs[i], acts.tokens[i], strict=True))
    health = stats.expert_health(model, docs, TOK, activations=acts)
    if model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        share = health["shared_share"]["d"]
        assert all(s is not None and 0.0 < s < 1.0 for s in share)
    else:
        assert health["shared_share"] == {}


def test_unused_experts_do_not_drag_the_median_to_zero():
    """Most experts of both layers unused (max_abs 0): the used ones are compared with each other, not flagged."""
    acts = stats.ExpertActivations(layers=[0, 1], max_abs=[[1.0, 1.2, 0, 0, 0, 0], [0.9, 6.5, 0, 0, 0, 0]],
                                   tokens=[[5, 3, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0]], near_zero=[[0.0] * 6] * 2,
                                   shared_share={})
    ranked = stats.outlier_ranking(acts)
    median = 1.0  # of 0.9, 1.0, 1.2, 6.5 (the lower middle value, as torch.median takes it)
    assert ranked[0][:2] == (1, 1) and ranked[0][3] == pytest.approx(6.5 / median)
    assert [r[3] for r in ranked if r[2] == 0] == [0.0] * 8
    assert [(i, e) for i, e, _, ratio in ranked if ratio >= 5.0] == [(1, 1)]


def test_the_ordinary_expert_is_one_some_token_reached():
    """The candidate is compared with the median of its layer's used experts: an unused expert (max_abs 0, ablation
    changes nothing) would make any candidate whose removal costs anything look like a super expert."""
    model = tiny_model("qwen3_moe")
    acts = stats.ExpertActivations(layers=[0, 1], max_abs=[[1.0] * 6, [1.0, 6.5, 1.2, 0, 0, 0]],
                                   tokens=[[4] * 6, [5, 3, 4, 0, 0, 0]], near_zero=[[0.0] * 6] * 2, shared_share={})
    (described,) = stats.describe_outliers(model, [(1, 1, 6.5, 6.5)], acts, _docs(n=2), TOK)
    assert described["ordinary_expert"] == 2  # the median of 1.0, 1.2, 6.5
