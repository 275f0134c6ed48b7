"""Statistics of where tokens go: load and balance, dead experts, router entropy and mass coverage, co-activation,
cross-layer transitions, and position effects. Each is a function of a `Trace` and a traced-layer number i."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.inspect.trace import MASS_LEVELS, Trace

CHUNK = 65536  # token rows per step of the co-occurrence counts: [CHUNK, E] at a time, whatever N is


def _members(idx: Tensor, mask: Tensor | None, num_experts: int) -> Tensor:
    a = torch.zeros(idx.shape[0], num_experts)
    src = torch.ones(idx.shape) if mask is None else mask.float()
    return a.scatter_add_(1, idx, src).clamp_(max=1.0)


def membership(trace: Trace, i: int) -> Tensor:
    """[N, E] float32: 1 where expert e is among token n's real (unpadded) experts at layer i."""
    return _members(trace.indices(i), trace.mask(i), trace.num_experts[i])


def _cooccurrence(trace: Trace, i: int, j: int) -> Tensor:
    """[E_i, E_j] float64: tokens for which expert a was chosen at layer i and expert b at layer j, counted CHUNK
    tokens at a time (memory [CHUNK, E], whatever N is)."""
    idx_i, mask_i, idx_j, mask_j = trace.indices(i), trace.mask(i), trace.indices(j), trace.mask(j)
    out = torch.zeros(trace.num_experts[i], trace.num_experts[j], dtype=torch.float64)
    for s in range(0, trace.num_tokens, CHUNK):
        a = _members(idx_i[s:s + CHUNK], None if mask_i is None else mask_i[s:s + CHUNK], trace.num_experts[i])
        b = _members(idx_j[s:s + CHUNK], None if mask_j is None else mask_j[s:s + CHUNK], trace.num_experts[j])
        out += (a.t() @ b).double()
    return out


def counts(trace: Trace, i: int) -> Tensor:
    """[E] int64: routed assignments per expert (padded slots excluded)."""
    idx, mask = trace.indices(i), trace.mask(i)
    flat = idx.reshape(-1) if mask is None else idx[mask]
    return torch.bincount(flat, minlength=trace.num_experts[i])


def load(trace: Trace, i: int) -> Tensor:
    """[E] float64: each expert's fraction of the routed assignments (sums to 1)."""
    c = counts(trace, i).double()
    return c / c.sum().clamp_min(1)


def balance(trace: Trace, i: int) -> dict[str, float]:
    """Coefficient of variation of the load (std / mean; 0 is perfectly balanced) and max / mean."""
    f = load(trace, i)
    mean = f.mean()
    return {"cv": float(f.std(unbiased=False) / mean), "max_over_mean": float(f.max() / mean)}


def dead_experts(trace: Trace, i: int, near: float = 0.1) -> dict[str, list[int]]:
    """`dead`: experts that received no token; `near_dead`: experts with some tokens but a load below `near` times
    the uniform load 1/E."""
    f = load(trace, i)
    uniform = 1.0 / f.numel()
    return {"dead": [int(e) for e in torch.nonzero(f == 0).flatten()],
            "near_dead": [int(e) for e in torch.nonzero((f > 0) & (f < near * uniform)).flatten()]}


def entropy(trace: Trace, i: int, bins: int = 20) -> dict:
    """Router entropy (nats) of each token's probability over experts: mean, quantiles, the maximum log E and a
    histogram of its distribution over tokens (`edges` [bins + 1], `counts` [bins])."""
    h = trace.entropy(i).double()
    top = math.log(trace.num_experts[i])
    ranked = h.sort().values
    q = [float(ranked[round(p * (h.numel() - 1))]) for p in (0.1, 0.5, 0.9)]
    hist = torch.histc(h, bins=bins, min=0.0, max=top)
    return {"mean": float(h.mean()), "p10": q[0], "p50": q[1], "p90": q[2], "max": top,
            "edges": torch.linspace(0, top, bins + 1).tolist(), "counts": [int(c) for c in hist]}


def mass_coverage(trace: Trace, i: int) -> dict[str, float]:
    """How many experts carry 50% / 90% of the mass: `load_50` / `load_90` over the layer's routed assignments
    (fewest experts whose loads sum to it), `token_50` / `token_90` the mean over tokens of the fewest experts whose
    router probabilities sum to it."""
    cum = load(trace, i).sort(descending=True).values.cumsum(0)
    token = trace.mass_experts(i).double().mean(dim=0)
    out = {}
    for j, q in enumerate(MASS_LEVELS):
        pct = round(q * 100)
        out[f"load_{pct}"] = int((cum < q - 1e-9).sum()) + 1
        out[f"token_{pct}"] = float(token[j])
    return out


def coactivation(trace: Trace, i: int) -> Tensor:
    """[E, E] int64: tokens for which experts a and b were both chosen at layer i (diagonal: tokens using a)."""
    return _cooccurrence(trace, i, i).round().long()


def transitions(trace: Trace, i: int, j: int | None = None) -> Tensor:
    """[E_i, E_j] float64, row-stochastic: P(a slot at traced layer j = i + 1 holds expert b | expert a was chosen at
    layer i), over every token and pair of slots. A row of an expert that received no token is uniform."""
    j = i + 1 if j is None else j
    if not 0 <= i < len(trace.layers) or not 0 <= j < len(trace.layers):
        raise ConfigError(f"layers ({i}, {j}): expected traced-layer numbers from 0 to {len(trace.layers) - 1}")
    c = _cooccurrence(trace, i, j)
    rows = c.sum(dim=1, keepdim=True)
    uniform = torch.full_like(c, 1.0 / c.shape[1])
    return torch.where(rows > 0, c / rows.clamp_min(1e-30), uniform)


def _capacity_drops(trace: Trace, i: int, capacity_factor: float) -> Tensor:
    """[N, k] bool: assignments a Switch/GShard capacity of capacity_factor * L * k / E per window would drop
    (first choices before second choices, then token order, as moekit's capacity dispatch does)."""
    idx, mask = trace.indices(i), trace.mask(i)
    n, k = idx.shape
    E = trace.num_experts[i]
    window, pos = trace.window, trace.positions
    win_len = torch.bincount(window)
    capacity = torch.ceil(capacity_factor * win_len.double() * k / E).long()  # [W]
    slot = torch.arange(k).expand(n, k)
    w = window[:, None].expand(n, k)
    key = ((w * E + idx) * k + slot) * (int(pos.max()) + 1) + pos[:, None]
    real = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask
    key = torch.where(real, key, torch.full_like(key, torch.iinfo(torch.int64).max))
    order = key.reshape(-1).argsort()
    group = (w * E + idx).reshape(-1)[order]  # sorted by group first
    start = torch.ones_like(group, dtype=torch.bool)
    start[1:] = group[1:] != group[:-1]
    first = torch.cummax(torch.where(start, torch.arange(group.numel()), 0), dim=0).values
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel()) - first
    return (rank.view(n, k) >= capacity[w]) & real


def position_effects(trace: Trace, i: int, bins: int = 8, capacity_factor: float = 1.0) -> dict:
    """Load and drop rate against the position in the model input: `edges` [bins + 1] over 0 .. seq_len,
    `load` [bins][E] (each bin's assignments per expert, rows sum to 1), `tokens` [bins], and `drop_rate` [bins],
    the fraction of the bin's assignments a capacity of `capacity_factor` * L * k / E per window would drop
    (OpenMoE's drop-towards-the-end)."""
    if capacity_factor <= 0:
        raise ConfigError(f"capacity_factor={capacity_factor}: expected a positive number")
    pos, idx = trace.positions, trace.indices(i)
    E = trace.num_experts[i]
    edges = torch.linspace(0, trace.seq_len, bins + 1)
    b = torch.bucketize(pos.double(), edges.double()[1:-1], right=True)  # [N] bin of each token
    real = torch.ones_like(idx, dtype=torch.bool) if trace.mask(i) is None else trace.mask(i)
    bb = b[:, None].expand_as(idx)
    per_bin = torch.bincount((bb * E + idx)[real], minlength=bins * E).view(bins, E).double()
    dropped = _capacity_drops(trace, i, capacity_factor)
    drops = torch.bincount(bb[dropped], minlength=bins).double()
    assigned = per_bin.sum(dim=1)
    return {"edges": edges.tolist(), "tokens": torch.bincount(b, minlength=bins).tolist(),
            "load": (per_bin / assigned.clamp_min(1)[:, None]).tolist(),
            "drop_rate": (drops / assigned.clamp_min(1)).tolist(), "capacity_factor": capacity_factor}
