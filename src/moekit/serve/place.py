"""Expert placement across devices (MoETuner): which device holds each layer's experts.

From a routing trace (`place_counts`: per-layer expert loads and the cross-layer dependency deps[l][i, j]), `place`
puts each layer's E experts on N devices with equal counts, minimising

    alpha * sum_l max_d load(l, d)  +  beta * sum_l cross(l)

(the slowest device sets a layer's time; cross(l) counts the tokens whose layer-l and layer-(l+1) experts sit on
different devices). Two solvers:
- the whole integer program (`place_program.exact_program`, scipy.optimize.milp), tried when it has at most
  `max_vars` variables: it grows as L E^2 N, so it is the reference for small models;
- a search (`place_search`): from a greedy start and seeded random ones, one-layer moves (swaps, assignments, and
  for small layers the exact one-layer program) until none improves.
The better placement is kept, and `SolveInfo` reports its gap to a lower bound: the program's proven bound when
it ran, else (and at least) `place_counts.lower_bound` (per layer max(total / N, hottest expert) for the load
term; per layer pair the dependency mass minus a b-matching or spectral bound on what can stay on its device).

EPLB-style replicas (`replicas` R > 0): each layer gets R extra copies, given one at a time to the expert with the
largest load per copy; every copy goes to the least-loaded device that has a free slot and no copy of that expert.
Slots per device: ceil((E + R) / N), so memory per device is never exceeded. A token's share of a replicated expert
is split evenly over its copies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from moekit.serve.place_counts import (
    PlacementError,
    RoutingCounts,
    capacities,
    check_devices,
    contiguous,
    counts_from_indices,
    counts_from_trace,
    cross_tokens,
    lower_bound,
    objective,
)
from moekit.serve.place_program import exact_program
from moekit.serve.place_search import greedy, search

__all__ = ["Placement", "PlacementError", "RoutingCounts", "SolveInfo", "add_replicas", "capacities",
           "check_devices", "contiguous", "counts_from_indices", "counts_from_trace", "cross_tokens", "greedy",
           "lower_bound", "objective", "place"]


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
    method: str  # "milp" (the whole program) or "search"
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
          max_vars: int = 20_000, time_limit: float = 60.0) -> tuple[Placement, SolveInfo]:
    """The placement of `counts`' experts on `devices` devices (module doc), and how it was found. `time_limit`
    bounds the search and the program together."""
    E, L = counts.num_experts, counts.num_layers
    check_devices(E, devices)
    if counts.tokens == 0 or counts.load.sum() == 0:
        raise PlacementError("trace: no routed tokens; expected a routing trace of at least one token")
    if replicas < 0:
        raise PlacementError(f"--replicas {replicas}: expected 0 or more")
    start = time.perf_counter()
    nvar = L * E * devices + L + (L - 1) * E * E * devices
    device, ran, converged = search(counts, devices, alpha, beta, time_limit)
    method, bound = "search", -np.inf
    status = (f"best of {ran} starts, a local optimum of one-layer moves" if converged else
              f"time limit reached after {ran} starts")
    if devices == 1:
        status = "optimal"
    elif nvar > max_vars:
        status += f"; whole program skipped: {nvar} variables > max_vars {max_vars}"
    else:
        left = max(time_limit - (time.perf_counter() - start), 1.0)
        exact, bound, exact_status = exact_program(counts, devices, alpha, beta, left)
        if exact is not None and objective(counts, exact, devices, alpha, beta)[0] <= \
                objective(counts, device, devices, alpha, beta)[0] + 1e-9:
            device, method, status = exact, "milp", exact_status
        else:
            status += f"; whole program: {exact_status}"
    value = objective(counts, device, devices, alpha, beta)[0]
    bound = value if devices == 1 else max(bound, lower_bound(counts, devices, alpha, beta))
    info = SolveInfo(method, float(value), float(min(bound, value)), time.perf_counter() - start, nvar, status)
    copies, slots = [], math.ceil(E / devices)
    for li in range(L):
        cp, slots = add_replicas(counts.load[li], device[li], devices, replicas)
        copies.append(cp)
    return Placement(devices, device, copies, slots), info
