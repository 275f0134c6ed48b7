"""Expert pruning: planted routing statistics give the expected drop sets; removed experts are never routed to
(the pruned block equals a per-token reference over the kept experts only); the reconstruction drop set is the
one a brute-force search over whole pruned blocks finds; bad ratios are refused."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning, LayerStats, Stats
from moekit.compress.prune import prune_block
from moekit.errors import ConfigError

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe")


def _windows(n: int = 3, length: int = 24, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 97, (length,), generator=g), "a" if i % 2 else "b") for i in range(n)]


def _planted(model, counts_per_layer: list[list[int]], domains: list[int] | None = None) -> Stats:
    """Stats whose top-1 selections reproduce `counts` (tokens per expert) in every layer."""
    layers = []
    for block, counts in zip(mh.view(model), counts_per_layer, strict=True):
        idx = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)])[:, None]
        t = len(idx)
        layers.append(LayerStats(block.layer, torch.zeros(t, 40), None, torch.zeros(t, block.num_experts),
                                 torch.ones(t, 1), idx, torch.tensor(domains) if domains else torch.full((t,), -1)))
    return Stats(layers, sum(counts_per_layer[0]), ["a", "b"])


def test_frequency_drops_the_least_used_experts():
    model = tiny_model("qwen3_moe")
    stats = _planted(model, [[5, 0, 9, 1, 7, 3], [1, 2, 3, 4, 5, 6]])
    p = mc.plan(model, stats, "frequency", 0.5)
    assert p.layers[0]["keep"] == [0, 2, 4]
    assert p.layers[1]["keep"] == [3, 4, 5]


def test_tcess_and_task_frequency_follow_the_task():
    model = tiny_model("qwen3_moe")
    # domain 0 ("a") uses experts 0, 1, 2; domain 1 ("b") uses 3, 4, 5; "b" has more tokens overall
    counts = [2, 2, 2, 4, 4, 4]
    domains = [0] * 6 + [1] * 12
    stats = _planted(model, [counts, counts], domains)
    for layer in stats.layers:
        layer.logits = torch.nn.functional.one_hot(layer.indices[:, 0], 6).float() * 5.0
    for method in ("frequency", "tcess"):
        assert mc.plan(model, stats, method, 0.5, task="a").layers[0]["keep"] == [0, 1, 2]
        assert mc.plan(model, stats, method, 0.5, task="b").layers[0]["keep"] == [3, 4, 5]
    assert mc.plan(model, stats, "frequency", 0.5).layers[0]["keep"] == [3, 4, 5]


def _reference_block(original: mh.BlockView, keep: list[int], x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax over the kept experts' logits, top-k, renormalised, the original experts' outputs."""
    w = original.router_params()["weight"][keep]
    out = torch.zeros_like(x)
    for t in range(len(x)):
        probs = torch.softmax(x[t] @ w.t(), dim=-1)
        top, idx = probs.topk(original.k)
        top = top / top.sum()
        for p, j in zip(top, idx, strict=True):
            out[t] += p * original.experts.expert(x[t:t + 1], keep[int(j)])[0]
    return out


def test_removed_experts_are_never_routed_to():
    model = tiny_model("qwen3_moe")
    original = copy.deepcopy(model)
    keep = [0, 2, 5]
    p = mc.Plan("frequency", 0.5, {b.layer: {"keep": keep} for b in mh.view(model)})
    mc.apply(model, p)
    x = torch.randn(10, 40)
    for block, ref in zip(mh.view(model), mh.view(original), strict=True):
        assert block.num_experts == 3
        routing = block.route(x)
        assert int(routing.indices.max()) < 3
        with torch.no_grad():
            got = block.block(x[None])[0]
            want = _reference_block(ref, keep, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pruning_method_runs_on_the_family(family):
    model = tiny_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(model, _windows(), grads=False, progress=False)
    ids = torch.randint(3, 97, (1, 12))
    for method in ("frequency", "tcess", "reconstruct"):
        pruned = mc.apply(copy.deepcopy(model), mc.plan(model, stats, method, 0.34))
        assert [b.num_experts for b in mh.view(pruned)] == [4] * len(mh.view(model))
        with torch.no_grad():
            assert torch.isfinite(pruned(ids).logits).all()


def test_reconstruct_finds_the_brute_force_drop_set():
    model = tiny_model("qwen2_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(model, _windows(4), progress=False)
    p = mc.plan(model, stats, "reconstruct", 0.34)
    for i, (block, s) in enumerate(zip(mh.view(model), stats.layers, strict=True)):
        x = s.x[:1024]
        with torch.no_grad():
            full = block.block(x[None])[0]
        errors = {}
        for drop in itertools.combinations(range(6), 2):
            keep = [e for e in range(6) if e not in drop]
            pruned = copy.deepcopy(model)
            target = mh.view(pruned)[i]
            prune_block(target, keep)
            with torch.no_grad():
                errors[tuple(keep)] = float((target.block(x[None])[0] - full).pow(2).sum())
        assert tuple(p.layers[block.layer]["keep"]) == min(errors, key=errors.get)


def test_plan_round_trips_through_json():
    model = tiny_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(model, _windows(), progress=False)
    p = mc.plan(model, stats, "tcess", 0.5, task="a")
    back = mc.Plan.from_json(p.to_json())
    assert back == p
    with pytest.raises(mc.PlanError, match="plan.json"):
        mc.Plan.from_json('{"method": "frequency"}')


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_zero_one_is_refused(ratio):
    model = tiny_model("qwen3_moe")
    stats = _planted(model, [[1] * 6, [1] * 6])
    with pytest.raises(ConfigError, match="ratio"):
        mc.plan(model, stats, "frequency", ratio)


def test_calibration_too_short_warns_with_the_count():
    model = tiny_model("qwen3_moe", num_experts=6)
    with pytest.warns(CalibrationWarning, match=r"2 tokens left \d+ experts never selected"):
        stats = mc.calibrate(model, [(torch.tensor([5, 6]), None)], progress=False)
    assert mc.plan(model, stats, "frequency", 0.5).experts_per_layer() == {0: 3, 1: 3}
