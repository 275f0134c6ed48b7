"""What placement reads from a routing trace and how a placement is scored (MoETuner's two costs).

Per layer l: `load[l, e]`, the assignments routed to expert e, and `deps[l][i, j]`, the tokens that go from expert i
at layer l to expert j at layer l+1 (a token with k_l experts at layer l counts 1/k_l for each of its k_l x k_{l+1}
pairs, so every layer-(l+1) assignment counts once). A placement [L, E] puts each layer's E experts on N devices
with equal counts (E/N each; the first E mod N devices get one more when N does not divide E). Its objective is

    alpha * sum_l max_d load(l, d)  +  beta * sum_l cross(l)

where load(l, d) sums the loads of layer l's experts on device d and cross(l) the dependency mass deps[l][i, j]
whose experts i and j sit on different devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from moekit.errors import MoekitError


class PlacementError(MoekitError, ValueError):
    """A placement request moekit cannot satisfy (device count, empty trace, ...)."""


@dataclass
class RoutingCounts:
    """What placement needs from a trace. load: [L, E] assignments; deps: L-1 arrays [E, E] (see module doc)."""

    load: np.ndarray
    deps: list[np.ndarray]
    tokens: int
    layers: list[int] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]


def counts_from_indices(indices: list[np.ndarray], num_experts: int, masks: list[np.ndarray | None] | None = None,
                        layers: list[int] | None = None) -> RoutingCounts:
    """RoutingCounts from per-layer expert ids [T, k_l] (same T tokens in every layer); masks [T, k_l] mark real
    slots (None: all real)."""
    if not indices or indices[0].shape[0] == 0:
        raise PlacementError("trace: no tokens; expected a routing trace of at least one token")
    masks = masks or [None] * len(indices)
    T = indices[0].shape[0]
    load = np.zeros((len(indices), num_experts))
    onehot = []  # per layer: [T, E] share of the token at each expert (1/k_l per real slot)
    for li, (idx, m) in enumerate(zip(indices, masks, strict=True)):
        real = np.ones(idx.shape, bool) if m is None else m.astype(bool)
        if idx.shape[0] != T:
            raise PlacementError(f"trace layer {li}: {idx.shape[0]} tokens, expected {T} like layer 0")
        if real.any() and (idx[real].min() < 0 or idx[real].max() >= num_experts):
            raise PlacementError(f"trace layer {li}: expert ids outside 0..{num_experts - 1}")
        load[li] = np.bincount(idx[real], minlength=num_experts)
        share = np.zeros((T, num_experts))
        kk = np.maximum(real.sum(1, keepdims=True), 1)
        np.add.at(share, (np.repeat(np.arange(T), idx.shape[1]), np.where(real, idx, 0).reshape(-1)),
                  (real / kk).reshape(-1))
        onehot.append(share)
    deps = []
    for li in range(len(indices) - 1):
        deps.append(onehot[li].T @ (onehot[li + 1] > 0))  # [E, E]: 1/k_l per pair
    return RoutingCounts(load, deps, T, list(layers) if layers is not None else list(range(len(indices))))


def counts_from_trace(trace) -> RoutingCounts:
    """RoutingCounts of a `moekit.inspect.trace.Trace` (every traced layer must have the same expert count)."""
    if trace.num_tokens == 0:
        raise PlacementError("trace: no tokens; expected a routing trace of at least one token")
    if len(set(trace.num_experts)) != 1:
        raise PlacementError(f"model: layers have {sorted(set(trace.num_experts))} experts; expected one expert "
                             "count for every MoE layer")
    n = len(trace.layers)
    idx = [trace.indices(i).numpy() for i in range(n)]
    masks = [None if trace.mask(i) is None else trace.mask(i).numpy() for i in range(n)]
    return counts_from_indices(idx, trace.num_experts[0], masks, trace.layers)


def capacities(num_experts: int, devices: int) -> np.ndarray:
    """Experts per device under equal counts: [N]."""
    base, extra = divmod(num_experts, devices)
    return np.array([base + (d < extra) for d in range(devices)])


def check_devices(num_experts: int, devices: int) -> None:
    if devices < 1:
        raise PlacementError(f"--devices {devices}: expected at least 1 device")
    if devices > num_experts:
        raise PlacementError(f"--devices {devices}: more devices than the model's {num_experts} experts per layer; "
                             f"expected at most {num_experts}")


def contiguous(num_experts: int, num_layers: int, devices: int) -> np.ndarray:
    """The usual expert-parallel layout: device d holds a contiguous block of expert ids. [L, E]"""
    check_devices(num_experts, devices)
    cap = capacities(num_experts, devices)
    row = np.repeat(np.arange(devices), cap)
    return np.tile(row, (num_layers, 1))


def objective(counts: RoutingCounts, device: np.ndarray, devices: int, alpha: float = 1.0,
              beta: float = 1.0) -> tuple[float, float, float]:
    """(objective, sum of per-layer max device load, cross-device tokens) of a primary placement [L, E]."""
    max_load = sum(np.bincount(device[li], counts.load[li], devices).max() for li in range(counts.num_layers))
    return alpha * max_load + beta * (cross := cross_tokens(counts, device).sum()), float(max_load), float(cross)


def cross_tokens(counts: RoutingCounts, device: np.ndarray) -> np.ndarray:
    """[L-1] tokens whose layer-l and layer-(l+1) experts sit on different devices."""
    out = [d[device[li][:, None] != device[li + 1][None, :]].sum() for li, d in enumerate(counts.deps)]
    return np.asarray(out, dtype=float)


def kept_bound(deps: np.ndarray, devices: int) -> float:
    """An upper bound on the dependency mass deps [E, E] that can stay on its device under equal counts (cap
    experts of each layer per device at most), the smaller of two:
    - b-matching: a layer-l expert shares its device with at most cap layer-(l+1) experts and vice versa, so the
      kept pairs form a b-matching (each row and column at most cap pairs); its maximum is a transportation LP
      (integral), solved by HiGHS, itself capped by sum_i (the cap largest deps[i, :]);
    - spectral (when N divides E): with X, Y [E, N] the two layers' 0/1 assignments, kept = tr(X^T deps Y),
      X^T X = Y^T Y = cap I and X 1 = Y 1 = 1; centring (P = I - 11^T / E) gives
      kept = sum(deps) / N + tr(X'^T P deps P Y') with X'^T X' = cap (I - 11^T / N), so by von Neumann's trace
      inequality kept <= sum(deps) / N + cap * (the N - 1 largest singular values of P deps P)."""
    E = deps.shape[0]
    cap = int(capacities(E, devices).max())
    bound = float(np.sort(deps, axis=1)[:, -min(cap, E):].sum())
    if cap >= E:
        return bound
    ij = np.arange(E * E)
    A = sparse.csr_array((np.ones(2 * E * E), (np.concatenate([ij // E, E + ij % E]), np.concatenate([ij, ij]))),
                         shape=(2 * E, E * E))
    res = linprog(-deps.reshape(-1), A_ub=A, b_ub=np.full(2 * E, float(cap)), bounds=(0, 1), method="highs")
    if res.status == 0:
        bound = min(bound, -res.fun)
    if E % devices == 0:
        P = np.eye(E) - 1.0 / E
        sv = np.linalg.svd(P @ deps @ P, compute_uv=False)
        bound = min(bound, deps.sum() / devices + cap * sv[:devices - 1].sum())
    return bound * (1 + 1e-9)


def lower_bound(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0) -> float:
    """A lower bound on the objective of any equal-count placement: per layer max(total / N, hottest expert) for
    the load term; per layer pair the dependency mass minus `kept_bound` for the cross term."""
    load_lb = sum(max(row.sum() / devices, row.max()) for row in counts.load)
    cross_lb = sum(d.sum() - kept_bound(d, devices) for d in counts.deps)
    return alpha * load_lb + beta * max(cross_lb, 0.0)
