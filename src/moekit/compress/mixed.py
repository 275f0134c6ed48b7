"""Mixed precision for experts (MC-MoE's pre-loading mixed-precision quantization): a format per expert chosen by an
integer program under a byte budget.

Each expert i gets exactly one format f from `CANDIDATES` (ternary = 2 bits, int4, int8, bf16 = 16 bits). The cost
of (i, f) is the bytes expert i holds in format f at its own width (codes, scales and float biases, exactly what
`apply_quant` will allocate). Its damage, with calibration `Stats`, is MC-MoE's factors in one number
(`output_errors`): over the tokens routed to i, (routing weight)^2 * ||expert_i(x) - expert_i,f(x)||^2; on
moekit-tiny this beats the two others at every budget measured (docs/compress.md). With a load dict it is
importance_i * ||W_i - deq(q_f(W_i))||^2 over both projections, importance_i the expert's share of its layer's
routed tokens (`stats["layers"][j]["load"]`) plus a small floor, so experts never routed to still prefer less error;
without statistics, the weight error alone. `scipy.optimize.milp` minimises the total damage subject to total bytes
<= budget.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, kron
from scipy.sparse import eye as sparse_eye
from torch import Tensor
from tqdm import tqdm

from moekit.compress.calibrate import LayerStats, Stats
from moekit.compress.qexperts import expert_parts, expert_widths
from moekit.core.experts.qformat import decode, encode, packed_nbytes
from moekit.errors import ConfigError
from moekit.hf.view import BlockView

CANDIDATES = ("ternary", "int4", "int8", "bf16")
_FLOOR = 0.01  # importance floor, as a fraction of a uniform expert's share
OUTPUT_TOKENS = 4096  # calibration tokens per layer the output errors are measured on


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


def expert_cost(block: BlockView, e: int, fmt: str, group_size: int) -> int:
    """Bytes expert e of `block` holds in `fmt` at its own width (both projections plus its float biases)."""
    ex = block.experts
    width, hidden = expert_widths(block)[e], ex.hidden_size
    up = 2 * width if ex.act.gated else width
    n = packed_nbytes(fmt, up, hidden, group_size) + packed_nbytes(fmt, hidden, width, group_size)
    if ex.down_proj_bias is not None:
        n += (up + hidden) * ex.down_proj_bias.element_size()
    return n


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


def _roundtrip(w: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    codes, scale = encode(w, fmt, group_size)
    return decode(codes, scale, fmt, w.shape[1], torch.float32)


def _expert_errors(block: BlockView, e: int, group_size: int, x: Tensor | None = None, r: Tensor | None = None,
                   tokens: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Expert e of `block` in each candidate format, quantized once: its weight error ||W - deq(q(W))||^2 over both
    projections [F], and with routed inputs x [n, H] and routing weights r [n, 1] (of `tokens` calibration tokens)
    the sum of r^2 * ||expert(x) - quantized expert(x)||^2 divided by `tokens` [F] (else None)."""
    ex = block.experts
    up, down, up_b, down_b = (None if t is None else t.float() for t in expert_parts(block, e))
    exact = None if x is None else F.linear(ex.act(F.linear(x, up, up_b)), down, down_b)
    weight, output = np.zeros(len(CANDIDATES)), None if x is None else np.zeros(len(CANDIDATES))
    for j, fmt in enumerate(CANDIDATES):
        q_up, q_down = _roundtrip(up, fmt, group_size), _roundtrip(down, fmt, group_size)
        weight[j] = float((q_up - up).pow(2).sum() + (q_down - down).pow(2).sum())
        if x is not None:
            y = F.linear(ex.act(F.linear(x, q_up, up_b)), q_down, down_b)
            output[j] = float((r * (y - exact)).pow(2).sum()) / tokens
    return weight, output


def _routed(s: LayerStats, e: int, max_tokens: int) -> tuple[Tensor | None, Tensor | None, int]:
    """The first `max_tokens` calibration inputs routed to expert e [n, H], their routing weights [n, 1] (None, None
    when no token chose e) and how many tokens were looked at."""
    gate = s.gate_weight()[:max_tokens, e]
    tokens = gate > 0
    if not tokens.any():
        return None, None, len(gate)
    return s.x[:max_tokens][tokens].float(), gate[tokens, None].float(), len(gate)


@torch.no_grad()
def output_errors(block: BlockView, s: LayerStats, group_size: int, max_tokens: int = OUTPUT_TOKENS) -> np.ndarray:
    """[E, F]: per expert and candidate format, sum over the calibration tokens routed to the expert of
    (routing weight)^2 * ||expert(x) - quantized expert(x)||^2, divided by the token count (MC-MoE's factors in one
    number: how often the expert is chosen, with what routing score, and how far its quantized output moves)."""
    out = np.zeros((block.num_experts, len(CANDIDATES)))
    for e in range(block.num_experts):
        x, r, tokens = _routed(s, e, max_tokens)
        if x is not None:
            out[e] = _expert_errors(block, e, group_size, x, r, tokens)[1]
    return out


def plan_mixed(blocks: list[BlockView], stats: dict | Stats | None, budget: int, group_size: int
               ) -> dict[int, list[str]]:
    """{layer: format per expert} minimising the damage within `budget` bytes: with calibration `Stats`, the
    routing-weighted output error (`output_errors`); with a load dict, load-weighted weight error; else weight
    error."""
    calibrated = isinstance(stats, Stats)
    if calibrated and [s.num_experts for s in stats.layers] != [b.num_experts for b in blocks]:
        raise ConfigError(f"stats: calibrated on layers of {[s.num_experts for s in stats.layers]} experts, the model "
                          f"has {[b.num_experts for b in blocks]}; expected statistics of this model")
    weights = None if calibrated else importance(blocks, stats)
    damage, cost, rows = [], [], []
    with torch.no_grad():
        for i, block in enumerate(tqdm(blocks, desc="mixed precision", unit="layer", leave=False)):
            errors = [_expert_errors(block, e, group_size, *(_routed(stats.layers[i], e, OUTPUT_TOKENS) if calibrated
                                                             else ()))
                      for e in range(block.num_experts)]
            top = max((float(o.max()) for _, o in errors if o is not None), default=0.0)
            for e, (err, out) in enumerate(errors):
                if calibrated:  # never-routed experts still prefer less weight error, far below any routed one's
                    damage.append((0.0 if out is None else out) + 1e-6 * err / max(err.max(), 1e-30) * top)
                else:
                    damage.append((weights[i][e] + _FLOOR / block.num_experts) * err)
                cost.append([expert_cost(block, e, f, group_size) for f in CANDIDATES])
                rows.append((block.layer, e))
    choice = allocate(np.asarray(damage), np.asarray(cost), budget)
    plan: dict[int, list[str]] = {b.layer: [""] * b.num_experts for b in blocks}
    for (layer, e), c in zip(rows, choice, strict=True):
        plan[layer][e] = CANDIDATES[c]
    return plan
