"""Sub-MoE as the paper describes it: K-means on the experts' outputs finds planted groups, and the union
decomposition at a truncated rank recovers what a group shares where the plain (and the frequency-weighted)
average keeps every member's conflicting directions."""

from __future__ import annotations

import warnings

import pytest
import torch

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.merge import plan_submoe, spherical_kmeans, subspace_merge
from moekit.compress.weights import ExpertWeights, read_experts, write_block
from moekit.errors import ConfigError


def test_spherical_kmeans_finds_planted_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 30, generator=g)
    rows = torch.cat([centres[c] * (1 + i) + 0.1 * torch.randn(30, generator=g)  # scale does not matter
                      for c in (0, 1, 2, 0, 2, 1, 0) for i in range(1)]).view(7, 30)
    groups = spherical_kmeans(rows, 3, first=0)
    assert sorted(groups) == [[0, 3, 6], [1, 5], [2, 4]]
    assert spherical_kmeans(rows, 3, first=0) == groups  # deterministic


def _stats(model):
    gen = torch.Generator().manual_seed(0)
    windows = [(torch.randint(3, 97, (24,), generator=gen), None) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return mc.calibrate(model, windows, progress=False)


def test_kmeans_plan_groups_near_copies_of_the_same_expert():
    """Experts {0, 3}, {1, 4}, {2, 5} are noisy copies of three experts: halving the layer groups them so."""
    model = tiny_model("qwen3_moe")
    gen = torch.Generator().manual_seed(1)
    for block in mh.view(model):
        w = read_experts(block)
        for src, dst in ((0, 3), (1, 4), (2, 5)):
            for t in (w.gate, w.up, w.down):
                t[dst] = t[src] + 0.05 * t[src].std() * torch.randn(t[src].shape, generator=gen)
        params = block.router_params()
        write_block(block, w, params["weight"].detach(), params.get("bias"), params.get("e_score_correction_bias"))
    plan = plan_submoe(model, _stats(model), 0.5)
    assert plan.options["cluster"] == "kmeans"
    for entry in plan.layers.values():
        assert sorted(sorted(g) for g in entry["groups"]) == [[0, 3], [1, 4], [2, 5]]


def test_truncated_union_decomposition_keeps_the_shared_part_that_averaging_blurs():
    """Three experts whose weights lie in a shared rank-2 subspace of the hidden space plus member-specific
    directions (conflicts). The target is the frequency-weighted merge of the shared parts; rank-2 Sub-MoE's
    relative error is about a quarter of the plain and the frequency-weighted averages', which keep the conflicts."""
    g = torch.Generator().manual_seed(0)
    n, width, hidden, freqs = 3, 20, 40, [0.6, 0.3, 0.1]
    basis = torch.linalg.qr(torch.randn(hidden, 2, generator=g)).Q  # [H, 2] shared
    shared = [torch.randn(2 * width, 2, generator=g) @ basis.t() * 3 for _ in range(n)]  # rows in span(basis)
    down_shared = [basis @ torch.randn(2, width, generator=g) * 3 for _ in range(n)]
    noise = [0.5 * torch.randn(2 * width, hidden, generator=g) for _ in range(n)]
    down_noise = [0.5 * torch.randn(hidden, width, generator=g) for _ in range(n)]
    gate_up = [s + e for s, e in zip(shared, noise, strict=True)]
    down = [s + e for s, e in zip(down_shared, down_noise, strict=True)]
    w = ExpertWeights(torch.stack([t[:width] for t in gate_up]), torch.stack([t[width:] for t in gate_up]),
                      torch.stack(down))
    target_up = sum(f * s for f, s in zip(freqs, shared, strict=True))
    target_down = sum(f * s for f, s in zip(freqs, down_shared, strict=True))

    def err(gate, up, dn):
        return float((torch.cat([gate, up]) - target_up).norm() / target_up.norm()), \
            float((dn - target_down).norm() / target_down.norm())

    sub = err(*subspace_merge(w, [0, 1, 2], freqs, rank=2)[:3])
    plain = err(w.gate.mean(0), w.up.mean(0), w.down.mean(0))
    weighted = err(*(sum(f * t[i] for i, f in enumerate(freqs)) for t in (w.gate, w.up, w.down)))
    assert max(sub) < 0.25  # measured 0.23 / 0.19: the noise inside the shared subspace stays
    assert min(plain) > 0.6 and min(weighted) > 2.5 * max(sub)  # measured 0.87 / 0.73 and 0.85 / 0.64
    # the default rank (one expert's, >= H here on the gate/up side) is the frequency-weighted average there
    full = subspace_merge(w, [0, 1, 2], freqs)
    torch.testing.assert_close(full[0], sum(f * w.gate[i] for i, f in enumerate(freqs)), atol=1e-5, rtol=1e-4)


def test_rank_and_cluster_run_through_plan_and_apply_and_bad_values_are_named():
    model = tiny_model("mixtral")
    stats = _stats(model)
    plan = plan_submoe(model, stats, 0.5, cluster="agglomerative", rank=4)
    assert plan.options["cluster"] == "agglomerative" and all(e["rank"] == 4 for e in plan.layers.values())
    merged = mc.apply(model, plan)
    assert [b.num_experts for b in mh.view(merged)] == [3, 3]
    with pytest.raises(ConfigError, match="cluster"):
        plan_submoe(model, stats, 0.5, cluster="spectral")
    with pytest.raises(ConfigError, match="rank"):
        plan_submoe(model, stats, 0.5, rank=0)
