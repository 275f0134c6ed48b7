"""compute_stats: the stats.json contract, filled from planted structure."""

from __future__ import annotations

import json

import pytest
import torch
from inspect_toy import WordTokenizer, docs_of, planted_lm

from moekit.inspect import compute_stats, trace

TOK = WordTokenizer()


def test_stats_json_contract_on_planted_model():
    perm = [1, 2, 3, 0]
    model = planted_lm([0, 1, 2, 3, 0, 1, 2, 3], num_experts=4, perm=perm)
    with torch.no_grad():
        for moe in model.moes:
            torch.nn.init.normal_(moe.experts.down_proj, std=0.01)
        model.moes[1].experts.down_proj[3] = 5.0  # a planted outlier expert at layer 1
    docs = docs_of([0, 1, 0, 1, 4, 5] * 6, domain="prose") + docs_of([2, 3, 6, 7, 7] * 6, domain="code")
    t = trace(model, docs, TOK, progress=False)
    s = compute_stats(t, model, docs, TOK, progress=False)
    json.loads(json.dumps(s, allow_nan=False))  # strict JSON
    assert s["tokens"] == 66 and s["model"] == "ToyLM"
    assert [ly["layer"] for ly in s["layers"]] == [0, 1]
    l0 = s["layers"][0]
    assert l0["load"] == pytest.approx([18 / 66, 18 / 66, 12 / 66, 18 / 66])
    assert l0["dead_experts"] == [] and l0["cv"] >= 0 and l0["entropy_mean"] >= 0
    assert l0["domain_share"]["prose"] == pytest.approx([0.5, 0.5, 0, 0])
    assert l0["domain_share"]["code"] == pytest.approx([0, 0, 12 / 30, 18 / 30])
    assert s["token_specialization"][0] == pytest.approx(1.0)
    assert len(s["transitions"]) == 1 and s["transitions"][0]["from"] == 0 and s["transitions"][0]["to"] == 1
    m = torch.tensor(s["transitions"][0]["matrix"], dtype=torch.float64)
    assert torch.allclose(m.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert [(e["layer"], e["expert"]) for e in s["super_experts"]] == [(1, 3)]
    assert set(s["super_experts"][0]) >= {"layer", "expert", "max_abs", "ablation_loss_delta"}


def test_stats_without_model_have_no_activation_entries():
    model = planted_lm([0, 1], num_experts=2)
    t = trace(model, docs_of([0, 1, 1]), TOK, progress=False)
    s = compute_stats(t)
    assert s["super_experts"] == [] and s["super_experts_checked"] is False
    assert s["layers"][0]["domain_share"] == {}
