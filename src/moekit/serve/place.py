"""Expert placement across devices (MoETuner): which device holds each layer's experts.

From a routing trace, per layer l: `load[l, e]`, the assignments routed to expert e, and `deps[l][i, j]`, the tokens
that go from expert i at layer l to expert j at layer l+1 (a token with k_l experts at layer l counts 1/k_l for each
of its k_l x k_{l+1} pairs, so every layer-(l+1) assignment counts once). A placement puts each layer's E experts on
N devices, equal counts (E/N each; the first E mod N devices get one more when N does not divide E). The integer
program (scipy.optimize.milp, HiGHS) minimises

    alpha * sum_l max_d load(l, d)  +  beta * sum_l cross(l)

where load(l, d) sums the loads of layer l's experts on device d (the slowest device sets the layer's time) and
cross(l) counts the dependency mass deps[l][i, j] whose experts i and j sit on different devices (the tokens that
move between devices from layer l to l+1). With x[l,e,d] binary and w[l,i,j,d] <= x[l,i,d], w <= x[l+1,j,d],
cross(l) = sum(deps[l]) - sum_ijd deps[l][i,j] w[l,i,j,d], tightened by sum_j w[l,i,j,d] = cap_d x[l,i,d] and
sum_i w[l,i,j,d] = cap_d x[l+1,j,d] (each device holds cap_d experts of every layer; this makes the relaxation's
bound the cross-term bound below). When N divides E the devices are interchangeable, and they are numbered by their
smallest layer-0 expert id (device d holds a layer-0 expert only if device d-1 holds a smaller one), which removes
the N! relabelled copies of every solution.

When the program has more than `max_vars` variables, or the solver's best solution within `time_limit` is worse
than it, a greedy placement (balanced by load, then each next-layer expert beside the experts that feed it, then
pairwise swaps) is used, and its gap to a lower bound is reported: per layer max(total / N, largest expert) for the
load term, and for the cross term, since the device of expert i holds at most c experts of layer l+1, at least
sum(deps) - sum_i (its c largest deps[i, :]) tokens must cross.

EPLB-style replicas (`replicas` R > 0): each layer gets R extra copies, given one at a time to the expert with the
largest load per copy; every copy goes to the least-loaded device that has a free slot and no copy of that expert.
Slots per device: ceil((E + R) / N), so memory per device is never exceeded. A token's share of a replicated expert
is split evenly over its copies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

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


@dataclass
class Placement:
    """device: [L, E] the device of each expert's primary copy; copies: per layer, per expert, the devices holding
    a copy (the primary first); slots: experts per device and layer the placement may use."""

    devices: int
    device: np.ndarray
    copies: list[list[list[int]]]
    slots: int

    def to_json(self) -> dict:
        return {"devices": self.devices, "slots": self.slots, "device_of_expert": self.device.tolist(),
                "copies": self.copies}

    @classmethod
    def from_json(cls, d: dict) -> Placement:
        return cls(int(d["devices"]), np.asarray(d["device_of_expert"], dtype=np.int64), d["copies"], int(d["slots"]))


@dataclass
class SolveInfo:
    method: str  # "milp" or "greedy"
    objective: float
    bound: float  # a lower bound on the optimal objective
    seconds: float
    variables: int
    status: str

    @property
    def gap(self) -> float:
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.bound) / self.objective)

    def to_json(self) -> dict:
        return {"method": self.method, "objective": self.objective, "bound": self.bound, "gap": self.gap,
                "seconds": self.seconds, "variables": self.variables, "status": self.status}


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


def lower_bound(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0) -> float:
    cap = int(capacities(counts.num_experts, devices).max())
    load_lb = sum(max(row.sum() / devices, row.max()) for row in counts.load)
    cross_lb = sum(d.sum() - np.sort(d, axis=1)[:, -cap:].sum() for d in counts.deps)
    return alpha * load_lb + beta * max(cross_lb, 0.0)


def _milp(counts: RoutingCounts, devices: int, alpha: float, beta: float, time_limit: float
          ) -> tuple[np.ndarray | None, float, str]:
    L, E, N = counts.num_layers, counts.num_experts, devices
    nx = L * E * N
    nw = (L - 1) * E * E * N
    nvar = nx + L + nw
    x = np.arange(nx).reshape(L, E, N)
    z = nx + np.arange(L)
    c = np.zeros(nvar)
    c[z] = alpha
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(cs, vs, lower, upper):
        nonlocal r
        rows.extend([r] * len(cs))
        cols.extend(cs)
        vals.extend(vs)
        lo.append(lower)
        hi.append(upper)
        r += 1

    cap = capacities(E, N)
    for li in range(L):
        for e in range(E):
            add(list(x[li, e]), [1.0] * N, 1, 1)
        for d in range(N):
            add(list(x[li, :, d]), [1.0] * E, cap[d], cap[d])
            add([*x[li, :, d], z[li]], [*counts.load[li], -1.0], -np.inf, 0)
    w = (nx + L + np.arange(nw)).reshape(max(L - 1, 0), E, E, N) if nw else None
    for li in range(L - 1):
        c[w[li]] = -beta * counts.deps[li][:, :, None]
        for i in range(E):
            for j in range(E):
                for d in range(N):
                    add([w[li, i, j, d], x[li, i, d]], [1.0, -1.0], -np.inf, 0)
                    add([w[li, i, j, d], x[li + 1, j, d]], [1.0, -1.0], -np.inf, 0)
        for d in range(N):  # x[l,i,d] * (sum_j x[l+1,j,d] = cap_d) and the same from the other side (RLT)
            for i in range(E):
                add([*w[li, i, :, d], x[li, i, d]], [1.0] * E + [-float(cap[d])], 0, 0)
                add([*w[li, :, i, d], x[li + 1, i, d]], [1.0] * E + [-float(cap[d])], 0, 0)
    upper = np.full(nvar, np.inf)
    upper[:nx] = 1
    upper[nx + L:] = 1
    if E % N == 0:  # equal devices are interchangeable: number them by their smallest layer-0 expert id
        for e in range(min(E, N)):  # expert e uses devices 0..e
            upper[x[0, e, e + 1:]] = 0
        for e in range(1, E):  # device d only when device d-1 holds a smaller expert id
            for d in range(1, min(e, N - 1) + 1):
                add([x[0, e, d], *x[0, :e, d - 1]], [1.0] + [-1.0] * e, -np.inf, 0)
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    A = sparse.csr_array((vals, (rows, cols)), shape=(r, nvar))
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None, -np.inf, res.message
    device = res.x[:nx].reshape(L, E, N).argmax(axis=2)
    const = beta * sum(d.sum() for d in counts.deps)
    bound = getattr(res, "mip_dual_bound", None)
    bound = -np.inf if bound is None or not np.isfinite(bound) else float(bound) + const
    return device, bound, "optimal" if res.status == 0 else str(res.message)


def greedy(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0, passes: int = 3
           ) -> np.ndarray:
    """A placement [L, E] without the program: layer by layer, experts in falling load go to the device with the
    most dependency mass from the previous layer (beta) minus the load it would reach (alpha), among devices with
    a free slot; then pairwise swaps within a layer while they lower the objective."""
    L, E, N = counts.num_layers, counts.num_experts, devices
    cap = capacities(E, N)
    device = np.zeros((L, E), dtype=np.int64)
    for li in range(L):
        used, dload = np.zeros(N, int), np.zeros(N)
        for e in np.argsort(-counts.load[li], kind="stable"):
            score = -alpha * (dload + counts.load[li, e])
            if li > 0:
                score = score + beta * np.bincount(device[li - 1], counts.deps[li - 1][:, e], N)
            score[used >= cap] = -np.inf
            d = int(np.argmax(score))
            device[li, e], used[d], dload[d] = d, used[d] + 1, dload[d] + counts.load[li, e]
    for _ in range(passes):
        improved = False
        for li in range(L):
            for a in range(E):
                for b in range(a + 1, E):
                    if device[li, a] == device[li, b]:
                        continue
                    before = _layer_cost(counts, device, li, N, alpha, beta)
                    device[li, [a, b]] = device[li, [b, a]]
                    if _layer_cost(counts, device, li, N, alpha, beta) < before - 1e-9:
                        improved = True
                    else:
                        device[li, [a, b]] = device[li, [b, a]]
        if not improved:
            break
    return device


def _layer_cost(counts: RoutingCounts, device: np.ndarray, li: int, devices: int, alpha: float, beta: float
                ) -> float:
    """The objective's terms that layer li's placement changes: its max device load and the crossings into and
    out of it."""
    cost = alpha * np.bincount(device[li], counts.load[li], devices).max()
    if li > 0:
        cost += beta * counts.deps[li - 1][device[li - 1][:, None] != device[li][None, :]].sum()
    if li + 1 < counts.num_layers:
        cost += beta * counts.deps[li][device[li][:, None] != device[li + 1][None, :]].sum()
    return float(cost)


def add_replicas(load: np.ndarray, primary: np.ndarray, devices: int, replicas: int) -> tuple[list[list[int]], int]:
    """EPLB-style copies for one layer: load [E], primary [E] devices. Returns (per expert the devices holding a
    copy, primary first; slots per device)."""
    E = load.shape[0]
    slots = math.ceil((E + replicas) / devices)
    copies = [[int(primary[e])] for e in range(E)]
    used = np.bincount(primary, minlength=devices)
    if used.max() > slots:
        raise PlacementError(f"placement: a device holds {used.max()} experts, above its {slots} slots")
    dload = np.bincount(primary, load, devices).astype(float)
    for _ in range(replicas):
        per_copy = load / np.array([len(c) for c in copies])
        for e in np.argsort(-per_copy, kind="stable"):
            free = [d for d in range(devices) if used[d] < slots and d not in copies[e]]
            if free:
                break
        else:
            break  # no expert has a device with a free slot that lacks a copy of it
        e, n = int(e), len(copies[e])
        for d in copies[e]:  # its load is re-split over n + 1 copies
            dload[d] -= load[e] / n - load[e] / (n + 1)
        d = min(free, key=lambda d: (dload[d], d))
        copies[e].append(d)
        used[d] += 1
        dload[d] += load[e] / (n + 1)
    return copies, slots


def place(counts: RoutingCounts, devices: int, *, replicas: int = 0, alpha: float = 1.0, beta: float = 1.0,
          max_vars: int = 200_000, time_limit: float = 60.0) -> tuple[Placement, SolveInfo]:
    """The placement of `counts`' experts on `devices` devices (module doc), and how it was found."""
    E, L = counts.num_experts, counts.num_layers
    check_devices(E, devices)
    if counts.tokens == 0 or counts.load.sum() == 0:
        raise PlacementError("trace: no routed tokens; expected a routing trace of at least one token")
    if replicas < 0:
        raise PlacementError(f"--replicas {replicas}: expected 0 or more")
    start = time.perf_counter()
    nvar = L * E * devices + L + (L - 1) * E * E * devices
    device, bound, status, method = None, -np.inf, f"skipped: {nvar} variables > max_vars {max_vars}", "greedy"
    if nvar <= max_vars and devices > 1:
        device, bound, status = _milp(counts, devices, alpha, beta, time_limit)
        method = "milp"
    fallback = greedy(counts, devices, alpha, beta)
    if device is None or objective(counts, fallback, devices, alpha, beta)[0] < \
            objective(counts, device, devices, alpha, beta)[0]:
        device, method = fallback, "greedy"  # no solution in time, or the solver's best is worse than greedy's
    value = objective(counts, device, devices, alpha, beta)[0]
    bound = max(bound, lower_bound(counts, devices, alpha, beta))
    if devices == 1:
        bound, status = value, "optimal"
    info = SolveInfo(method, float(value), float(min(bound, value)), time.perf_counter() - start, nvar, status)
    copies, slots = [], math.ceil(E / devices)
    for li in range(L):
        cp, slots = add_replicas(counts.load[li], device[li], devices, replicas)
        copies.append(cp)
    return Placement(devices, device, copies, slots), info
