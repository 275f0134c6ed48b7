"""Merging: alignment recovers a neuron-permuted copy (M-SMoE gives back the same function), Sub-MoE merges
identical experts exactly, DERN recombines a permuted copy's neurons into their twins, M-SMoE groups by router
similarity, the fitted router row of a merged group reproduces the members' log-sum-exp; every merge runs on
several families."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.dern import _recombine, plan_dern
from moekit.compress.merge import align, merge_aligned, subspace_merge
from moekit.compress.weights import read_experts, write_block


def _windows(n: int = 4, length: int = 24) -> list:  # 96 tokens
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 97, (length,), generator=g), None) for _ in range(n)]


def _stats(model, grads: bool = False, n: int = 4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return mc.calibrate(model, _windows(n), grads=grads, progress=False)


def _expert_out(w, e: int, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ w.gate[e].t()) * (x @ w.up[e].t())) @ w.down[e].t()


def _with_permuted_copy(model, source: int = 0, target: int = 1, seed: int = 0):
    """Expert `target` of every layer becomes expert `source` with its neurons shuffled; returns the perms."""
    perms = []
    for block in mh.view(model):
        w = read_experts(block)
        perm = torch.randperm(w.width, generator=torch.Generator().manual_seed(seed))
        w.gate[target], w.up[target] = w.gate[source][perm], w.up[source][perm]
        w.down[target] = w.down[source][:, perm]
        params = block.router_params()
        router = params["weight"].detach().clone()
        router[target] = router[source]
        write_block(block, w, router, params.get("bias"), params.get("e_score_correction_bias"))
        perms.append(perm)
    return perms


def test_alignment_recovers_a_permutation():
    model = tiny_model("qwen3_moe")
    perms = _with_permuted_copy(model)
    w = read_experts(mh.view(model)[0])
    found = align(w.neurons(0), w.neurons(1))
    assert torch.equal(perms[0][torch.tensor(found)], torch.arange(w.width))


def test_merging_an_expert_with_its_permuted_copy_gives_it_back():
    model = tiny_model("qwen3_moe")
    _with_permuted_copy(model)
    w = read_experts(mh.view(model)[0])
    perm = align(w.neurons(0), w.neurons(1))
    gate, up, down, *_ = merge_aligned(w, [0, 1], [0.3, 0.7], [list(range(w.width)), perm])
    x = torch.randn(7, 40)
    merged = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(merged, _expert_out(w, 0, x), rtol=1e-5, atol=1e-6)
    # without alignment the same average is a different function
    gate, up, down, *_ = merge_aligned(w, [0, 1], [0.5, 0.5], [list(range(w.width))] * 2)
    naive = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    assert (naive - _expert_out(w, 0, x)).abs().max() > 1e-3


def test_msmoe_groups_the_copy_with_its_original_and_keeps_the_function():
    model = tiny_model("qwen3_moe")
    _with_permuted_copy(model)
    stats = _stats(model)
    for s in stats.layers:  # the copy (same router row, so same logits) becomes the least used expert
        s.indices[s.indices == 1] = 0
    p = mc.plan(model, stats, "msmoe", 1 / 6)
    before = read_experts(mh.view(model)[0])
    for entry in p.layers.values():
        group = next(g for g in entry["groups"] if len(g) > 1)
        assert sorted(group) == [0, 1]
    merged = mc.apply(copy.deepcopy(model), p)
    after = read_experts(mh.view(merged)[0])
    slot = p.layers[0]["keep"].index(p.layers[0]["groups"][[len(g) for g in p.layers[0]["groups"]].index(2)][0])
    x = torch.randn(5, 40)
    torch.testing.assert_close(_expert_out(after, slot, x), _expert_out(before, 0, x), rtol=1e-5, atol=1e-6)


def test_merged_router_row_fits_the_members_logsumexp():
    model = tiny_model("mixtral")
    stats = _stats(model, n=8)  # 192 tokens, over 4 per hidden dimension (H = 40): the fit is used
    p = mc.plan(model, stats, "msmoe", 0.5)
    s, entry = stats.layers[0], p.layers[0]
    rows = torch.tensor(entry["router"])
    for g, members in enumerate(entry["groups"]):
        target = torch.logsumexp(s.logits[:, members], dim=1)
        fitted = s.x @ rows[g]
        # least squares: the residual is orthogonal to the inputs, so no other row fits better
        assert (s.x.t() @ (fitted - target)).abs().max() < 1e-2 * s.x.abs().sum()
        if len(members) == 1:
            torch.testing.assert_close(fitted, target)


def test_too_few_tokens_keep_the_dominant_router_row():
    model = tiny_model("mixtral")
    p = mc.plan(model, _stats(model), "msmoe", 0.5)  # 96 tokens < 4 * 40
    weight = mh.view(model)[0].router_params()["weight"].detach()
    for g, members in enumerate(p.layers[0]["groups"]):
        torch.testing.assert_close(torch.tensor(p.layers[0]["router"][g]), weight[members[0]])


def test_submoe_on_identical_experts_is_exact():
    model = tiny_model("qwen3_moe")
    w = read_experts(mh.view(model)[0])
    for e in (1, 2):
        w.gate[e], w.up[e], w.down[e] = w.gate[0], w.up[0], w.down[0]
    gate, up, down, *_ = subspace_merge(w, [0, 1, 2], [0.2, 0.5, 0.3])
    torch.testing.assert_close(gate, w.gate[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up, w.up[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(down, w.down[0], rtol=1e-5, atol=1e-6)


def test_dern_recombines_a_permuted_copy_into_its_twin():
    model = tiny_model("qwen3_moe")
    perms = _with_permuted_copy(model, source=0, target=5)
    stats = _stats(model)
    for s in stats.layers:  # expert 5 least used: DERN drops it
        s.indices[s.indices == 5] = 0
    p = plan_dern(model, stats, 1 / 6)
    entry = p.layers[0]
    assert 5 not in entry["keep"]
    targets = entry["assign"]["5"]
    assert all(k == entry["keep"].index(0) for k, _ in targets)
    assert [i for _, i in targets] == perms[0].tolist()
    w = read_experts(mh.view(model)[0])
    merged = _recombine(w, entry)[entry["keep"].index(0)]
    torch.testing.assert_close(merged[0], w.gate[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[2], w.down[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss", "phimoe"])
def test_every_merge_runs_on_the_family(family):
    model = tiny_model(family)
    stats = _stats(model)
    ids = torch.randint(3, 97, (1, 12))
    for method in ("msmoe", "submoe", "dern"):
        merged = mc.apply(copy.deepcopy(model), mc.plan(model, stats, method, 0.5))
        assert [b.num_experts for b in mh.view(merged)] == [3] * len(mh.view(model))
        with torch.no_grad():
            assert torch.isfinite(merged(ids).logits).all()
