"""Low-rank compression of experts (MC-SMoE's second step, its SVD part; meant for the experts merging left):
every projection of every expert of a layer is replaced by its best rank-r approximation (truncated SVD,
Eckart-Young), W = U S V^T ~ (U_r S_r) V_r^T, stored as the two factors (`moekit.core.experts.lowrank.LowRankExperts`).

r = round(fraction * min(H, I)) per layer, at least 1. The factors hold r (2I + H) + r (H + I) = r (3I + 2H)
numbers per expert against 3 H I dense, so they save bytes when r < 3 H I / (3I + 2H) (r < 177 for moekit-tiny's
H = 256, I = 384: fractions below about 0.69). GPT-OSS's expert biases are kept whole.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.compress.plan import Plan
from moekit.core.experts.lowrank import make_lowrank
from moekit.errors import ConfigError
from moekit.hf.view import view


def plan_lowrank(model: nn.Module, fraction: float) -> Plan:
    """The rank each MoE layer's experts are cut to: round(fraction * min(H, I)), at least 1."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"lowrank fraction={fraction}: expected a fraction strictly between 0 and 1")
    layers = {}
    for block in view(model):
        full = min(block.experts.hidden_size, block.experts.intermediate_size)
        layers[block.layer] = {"keep": list(range(block.num_experts)), "rank": max(1, round(fraction * full))}
    return Plan("lowrank", fraction, layers)


def _factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [m, n] -> a [m, r], b [r, n] with a @ b the best rank-r approximation of w (in float64); a rank above
    min(m, n) pads with zero components (exact)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a = torch.zeros(w.shape[0], rank, dtype=torch.float64)
    b = torch.zeros(rank, w.shape[1], dtype=torch.float64)
    n = min(rank, s.numel())
    a[:, :n], b[:n] = u[:, :n] * s[:n], vh[:n]
    return a.to(w.dtype), b.to(w.dtype)


@torch.no_grad()
def apply_lowrank(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the experts of every layer in `plan` by their rank-r factors. In place; returns `model`."""
    for block in view(model):
        entry = plan.layers.get(block.layer)
        if entry is None:
            continue
        ex = block.experts
        gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
        if ex.transposed:  # GPT-OSS: [E, H, 2I] / [E, I, H] -> [E, 2I, H] / [E, H, I], gate/up still interleaved
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        biases = [None if b is None else b.detach().clone() for b in (ex.gate_up_proj_bias, ex.down_proj_bias)]
        module = make_lowrank(block.block, int(entry["rank"]), ex.hidden_size, block.family.experts)
        if module.gate_up_proj_bias is not None:
            module.gate_up_proj_bias.copy_(biases[0])
            module.down_proj_bias.copy_(biases[1])
        for e in range(block.num_experts):
            a, b = _factors(gate_up[e], module.rank)
            module.gate_up_a[e], module.gate_up_b[e] = a, b
            a, b = _factors(down[e], module.rank)
            module.down_a[e], module.down_b[e] = a, b
    return model
