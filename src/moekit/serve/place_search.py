"""Placement without the whole program: a greedy start, then exact re-placement of one layer at a time.

`greedy`: layer by layer, experts in falling load go to the device with the most dependency mass from the previous
layer (beta) minus the load it would reach (alpha), among devices with a free slot; then pairwise swaps within a
layer while they lower the objective.

`improve`: block coordinate descent. Each layer in turn is re-placed by `place_program.layer_program` (exact for that
layer with the others fixed) and kept when the objective falls; sweeps repeat until a sweep changes nothing or the
time is up. Every accepted step lowers the objective, so it ends at a placement no single-layer change improves.
"""

from __future__ import annotations

import time

import numpy as np

from moekit.serve.place_counts import RoutingCounts, capacities, objective
from moekit.serve.place_program import layer_program


def greedy(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0, passes: int = 3
           ) -> np.ndarray:
    """A placement [L, E] without the program (module doc)."""
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


def improve(counts: RoutingCounts, device: np.ndarray, devices: int, alpha: float = 1.0, beta: float = 1.0,
            seconds: float = 60.0) -> tuple[np.ndarray, int]:
    """`device` [L, E] improved by exact one-layer re-placements (module doc) within `seconds`; returns it and the
    sweeps run."""
    deadline = time.perf_counter() + seconds
    device = device.copy()
    best = objective(counts, device, devices, alpha, beta)[0]
    sweeps = 0
    while True:
        sweeps += 1
        improved = False
        for li in range(counts.num_layers):
            left = deadline - time.perf_counter()
            if left <= 0:
                return device, sweeps
            new = layer_program(counts, device, li, devices, alpha, beta, left)
            if new is None:
                continue
            trial = device.copy()
            trial[li] = new
            value = objective(counts, trial, devices, alpha, beta)[0]
            if value < best - 1e-9:
                device, best, improved = trial, value, True
        if not improved:
            return device, sweeps
