"""Mixed precision: the integer program is optimal (against enumeration), respects the byte budget, and gives more
bits to the experts the statistics say are important (by load, or by routing-weighted output error, which equals a
per-token reference through the quantized experts themselves)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress import calibrate
from moekit.compress.calibrate import CalibrationWarning, LayerStats, Stats
from moekit.compress.mixed import CANDIDATES, allocate, output_errors
from moekit.compress.qexperts import quantize_experts
from moekit.compress.quantize import apply_quant, plan_quant, resident_bytes
from moekit.core.experts.qformat import BITS
from moekit.errors import ConfigError


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_enumerated_optimum(seed):
    rng = np.random.default_rng(seed)
    n, f = 5, 4
    cost = np.sort(rng.integers(10, 100, (n, f)), axis=1)
    damage = np.sort(rng.random((n, f)), axis=1)[:, ::-1]  # more bytes, less damage
    budget = float(cost[:, 0].sum() + rng.integers(0, cost[:, -1].sum() - cost[:, 0].sum()))
    choice = allocate(damage, cost, budget)
    best = min(sum(damage[i, c] for i, c in enumerate(cs)) for cs in itertools.product(range(f), repeat=n)
                if sum(cost[i, c] for i, c in enumerate(cs)) <= budget)
    assert sum(cost[i, c] for i, c in enumerate(choice)) <= budget
    assert sum(damage[i, c] for i, c in enumerate(choice)) == pytest.approx(best, rel=1e-9)


def test_allocation_refuses_an_impossible_budget():
    with pytest.raises(ConfigError, match="at least 30 bytes"):
        allocate(np.ones((3, 2)), np.array([[10, 20]] * 3), 29)


def _identical_experts(model):
    """Every expert of a layer gets expert 0's weights, so only the importance tells them apart."""
    with torch.no_grad():
        for b in mh.view(model):
            for w in (b.experts.module.gate_up_proj, b.experts.module.down_proj):
                w.copy_(w[:1].expand_as(w))
    return model


def _plan_between_ternary_and_int8(model, stats, order: list[int]):
    """The mixed plan at a budget halfway between all-ternary and all-int8: within budget, and in both layers the
    bits fall along `order` (most important expert first), the first getting more than the last."""
    ternary = plan_quant(model, None, "ternary").expert_bytes
    int8 = plan_quant(model, None, "int8").expert_bytes
    budget = (ternary + int8) // 2
    plan = plan_quant(model, stats, f"mixed:{budget}")
    assert plan.expert_bytes <= budget
    for layer in (0, 1):
        bits = [BITS[plan.layers[layer][e]] for e in order]
        assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]
    return plan, budget


def test_mixed_budget_is_respected_and_important_experts_get_more_bits():
    model = _identical_experts(tiny_model("qwen3_moe", hidden_size=64, moe_intermediate_size=32))
    load = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    order = [3, 0, 5, 1, 4, 2]  # planted: expert order[i] has load[i]
    stats = {"layers": [{"layer": layer, "load": [load[order.index(e)] for e in range(6)]} for layer in (0, 1)]}
    plan, budget = _plan_between_ternary_and_int8(model, stats, order)
    apply_quant(model, plan)
    assert resident_bytes(model)["experts"] == plan.expert_bytes <= budget


def test_mixed_without_stats_and_with_room_for_everything():
    model = tiny_model("mixtral")
    plan = plan_quant(model, None, "mixed:10MB")
    assert [f for fs in plan.layers.values() for f in fs] == [CANDIDATES[-1]] * 12  # all bf16
    with pytest.raises(ConfigError, match="mixed:100: the experts need at least"):
        plan_quant(model, None, "mixed:100")


def test_mixed_stats_errors():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="stats: expected"):
        plan_quant(model, {"layers": [{"layer": 0}]}, "mixed:30000")
    with pytest.raises(ConfigError, match=r"stats.layers \(layer 1\): expected a non-negative `load` of 6"):
        plan_quant(model, {"layers": [{"layer": 0, "load": [1 / 6] * 6}, {"layer": 1, "load": [1]}]},
                   "mixed:30000")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_output_errors_match_a_per_token_reference(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, [(torch.randint(3, 97, (30,), generator=g), None) for _ in range(3)],
                          progress=False)
    block, s = mh.view(model)[1], stats.layers[1]
    errors = output_errors(block, s, group_size=8)
    for j, fmt in enumerate(CANDIDATES[:3]):  # ternary, int4, int8: the formats a whole layer can be put in
        quantized = quantize_experts(block, [fmt] * block.num_experts, 8)
        want = torch.zeros(block.num_experts, dtype=torch.float64)
        with torch.no_grad():
            for t in range(len(s.x)):
                for r, e in zip(s.weights[t].tolist(), s.indices[t].tolist(), strict=True):
                    x = s.x[t: t + 1]
                    diff = quantized.run_expert(x, e) - block.experts.expert(x, e)
                    want[e] += r * r * float(diff.pow(2).sum())
        np.testing.assert_allclose(errors[:, j], (want / len(s.x)).numpy(), rtol=1e-4, atol=1e-12)
    routed = s.counts() > 0
    assert routed.sum() >= 2 and (errors[routed, 0] > errors[routed, 2]).all()  # ternary moves outputs more


def test_calibrated_allocation_gives_more_bits_to_experts_with_more_routed_weight():
    model = _identical_experts(tiny_model("qwen3_moe", hidden_size=64, moe_intermediate_size=32))
    tokens = [40, 25, 15, 10, 6, 4]
    order = [3, 0, 5, 1, 4, 2]  # planted: expert order[i] gets tokens[i] of the calibration tokens
    g = torch.Generator().manual_seed(0)
    layers = []
    for block in mh.view(model):
        idx = torch.tensor([order[i] for i, n in enumerate(tokens) for _ in range(n)])[:, None]
        t = len(idx)
        layers.append(LayerStats(block.layer, torch.randn(t, 64, generator=g), None, torch.zeros(t, 6),
                                 torch.ones(t, 1), idx, torch.full((t,), -1)))
    stats = Stats(layers, sum(tokens))
    _plan_between_ternary_and_int8(model, stats, order)
