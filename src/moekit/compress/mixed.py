"""Mixed precision for experts (MC-MoE's pre-loading mixed-precision quantization): a format per expert chosen by an
integer program under a byte budget.

Each expert i gets exactly one format f from `CANDIDATES` (ternary = 2 bits, int4, int8, bf16 = 16 bits). The cost
of (i, f) is the bytes expert i holds in format f (codes, scales and float biases, exactly what `apply_quant` will
allocate); its damage is importance_i * ||W_i - deq(q_f(W_i))||^2 over both projections, where importance_i is the
expert's share of its layer's routed tokens (`stats["layers"][j]["load"]`, uniform without statistics) plus a
small floor, so experts never routed to still prefer less error when the budget has room. `scipy.optimize.milp`
minimises the total damage subject to total bytes <= budget.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, kron
from scipy.sparse import eye as sparse_eye
from tqdm import tqdm

from moekit.compress.qformat import decode, encode, packed_nbytes
from moekit.errors import ConfigError
from moekit.hf.view import BlockView

CANDIDATES = ("ternary", "int4", "int8", "bf16")
_FLOOR = 0.01  # importance floor, as a fraction of a uniform expert's share


def allocate(damage: np.ndarray, cost: np.ndarray, budget: float) -> list[int]:
    """The column chosen per row of damage / cost [n, F] minimising total damage with total cost <= budget
    (exactly one column per row). Raises ConfigError when even the cheapest choice per row is over budget."""
    n, f = damage.shape
    cheapest = float(cost.min(axis=1).sum())
    if cheapest > budget:
        raise ConfigError(f"mixed:{int(budget)}: the experts need at least {int(cheapest)} bytes even at the "
                          f"smallest format; expected a budget of at least that")
    scale = float(damage.max()) or 1.0
    one_each = LinearConstraint(kron(sparse_eye(n), np.ones((1, f))), 1, 1)
    within = LinearConstraint(csr_array(cost.reshape(1, -1).astype(float)), -np.inf, budget)
    res = milp(damage.ravel() / scale, integrality=np.ones(n * f), bounds=Bounds(0, 1),
               constraints=[one_each, within], options={"mip_rel_gap": 1e-6, "time_limit": 120})
    if res.x is None:
        raise ConfigError(f"mixed:{int(budget)}: the integer program found no allocation ({res.message})")
    choice = res.x.reshape(n, f).argmax(axis=1)
    if cost[np.arange(n), choice].sum() > budget:  # a rounded relaxation would show here; milp returns integers
        raise ConfigError(f"mixed:{int(budget)}: the integer program returned an allocation over budget")
    return choice.tolist()


def expert_cost(block: BlockView, fmt: str, group_size: int) -> int:
    """Bytes one expert of `block` holds in `fmt` (both projections plus its float biases)."""
    ex = block.experts
    width, hidden = ex.intermediate_size, ex.hidden_size
    up = 2 * width if ex.act.gated else width
    n = packed_nbytes(fmt, up, hidden, group_size) + packed_nbytes(fmt, hidden, width, group_size)
    if ex.gate_up_proj_bias is not None:
        n += (up + hidden) * ex.gate_up_proj_bias.element_size()
    return n


def quant_error(w: torch.Tensor, fmt: str, group_size: int) -> float:
    """||w - deq(q(w))||^2 of one [out, in] matrix."""
    codes, scale = encode(w, fmt, group_size)
    return float((decode(codes, scale, fmt, w.shape[1], torch.float32) - w.float()).pow(2).sum())


def importance(blocks: list[BlockView], stats: dict | None) -> list[np.ndarray]:
    """Per block, each expert's share of the layer's routed tokens (from stats' `load`, else uniform)."""
    if stats is None:
        return [np.full(b.num_experts, 1.0 / b.num_experts) for b in blocks]
    try:
        loads = {int(entry["layer"]): [float(v) for v in entry["load"]] for entry in stats["layers"]}
    except (KeyError, TypeError, ValueError):
        raise ConfigError("stats: expected {'layers': [{'layer': int, 'load': [float per expert]}, ...]}") from None
    out = []
    for b in blocks:
        load = loads.get(b.layer)
        if load is None or len(load) != b.num_experts or min(load) < 0:
            raise ConfigError(f"stats.layers (layer {b.layer}): expected a non-negative `load` of {b.num_experts} "
                              f"values, got {'none' if load is None else len(load)}")
        total = sum(load) or 1.0
        out.append(np.asarray(load) / total)
    return out


def plan_mixed(blocks: list[BlockView], stats: dict | None, budget: int, group_size: int) -> dict[int, list[str]]:
    """{layer: format per expert} minimising importance-weighted quantization error within `budget` bytes."""
    weights = importance(blocks, stats)
    damage, cost, rows = [], [], []
    with torch.no_grad():
        for block, imp in tqdm(list(zip(blocks, weights, strict=True)), desc="mixed precision", unit="layer",
                               leave=False):
            costs = [expert_cost(block, f, group_size) for f in CANDIDATES]
            for e in range(block.num_experts):
                up, down = block.experts.up_weight(e), block.experts.down_weight(e)
                err = [quant_error(up, f, group_size) + quant_error(down, f, group_size) for f in CANDIDATES]
                damage.append([(imp[e] + _FLOOR / block.num_experts) * v for v in err])
                cost.append(costs)
                rows.append((block.layer, e))
    choice = allocate(np.asarray(damage), np.asarray(cost), budget)
    plan: dict[int, list[str]] = {b.layer: [""] * b.num_experts for b in blocks}
    for (layer, e), c in zip(rows, choice, strict=True):
        plan[layer][e] = CANDIDATES[c]
    return plan
