"""Placement without the whole program: a greedy start, then moves that re-place one layer at a time.

`greedy`: layer by layer, experts in falling load go to the device with the most dependency mass from the previous
layer (beta) minus the load it would reach (alpha), among devices with a free slot; then pairwise swaps.

With the other layers fixed, expert e of layer l on device d keeps gain[e, d] of dependency mass
(`place_program.layer_gain`), so a layer's cost is alpha * max_d load(d) - beta * sum_e gain[e, device(e)] plus a
constant. `improve` sweeps the layers; on each it tries, keeping whatever lowers the objective:
- `swap_layer`: the best swap of two experts on different devices, repeated while one improves (all E^2 swaps are
  scored at once: a swap changes the gain of its two experts and the load of their two devices);
- the linear assignment of experts to device slots by gain alone (load ignored; `layer_program` with alpha 0);
- the exact one-layer program (`place_program.layer_program`) when it has at most `max_binaries` binaries (E x N;
  its integer program slows quickly above that).
Sweeps repeat until one changes nothing or the time is up. Every accepted move lowers the objective, so it ends at
a placement no such move improves.

`search`: `improve` without the exact program from the greedy placement and from `starts` - 1 random equal-count
placements (seeded), then `improve` with it from the best of them.
"""

from __future__ import annotations

import time

import numpy as np

from moekit.serve.place_counts import RoutingCounts, capacities, objective
from moekit.serve.place_program import layer_gain, layer_program


def greedy(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0, passes: int = 3
           ) -> np.ndarray:
    """A placement [L, E] without the program (module doc); `passes` sweeps of `swap_layer` over the layers."""
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
        if not any([swap_layer(counts, device, li, N, alpha, beta) for li in range(L)]):
            break
    return device


def swap_layer(counts: RoutingCounts, device: np.ndarray, li: int, devices: int, alpha: float = 1.0,
               beta: float = 1.0) -> bool:
    """Best-improvement swaps of two layer-li experts on different devices, in place, while one lowers the
    objective; returns whether any did."""
    E, N = counts.num_experts, devices
    gain = layer_gain(counts, device, li, N)  # fixed while only layer li moves
    w = counts.load[li]
    row = device[li]
    changed = False
    while N > 1:
        dload = np.bincount(row, w, N)
        # the largest device load outside each device pair (d1, d2): the first of the top three that is neither
        top = np.argsort(-dload, kind="stable")[:3]
        rest = np.full((N, N), 0.0)
        for t in top[::-1]:
            rest = np.where((np.arange(N)[:, None] != t) & (np.arange(N)[None, :] != t), dload[t], rest)
        da, db = row[:, None], row[None, :]  # [E, E]: a's device, b's device
        new_a = dload[da] - w[:, None] + w[None, :]  # da's load after a leaves and b arrives
        new_b = dload[db] - w[None, :] + w[:, None]
        peak = np.maximum(rest[da, db], np.maximum(new_a, new_b))
        kept = gain[np.arange(E)[:, None], db] - gain[np.arange(E)[:, None], da] \
            + gain[np.arange(E)[None, :], da] - gain[np.arange(E)[None, :], db]
        delta = alpha * (peak - dload.max()) - beta * kept
        delta[da == db] = np.inf
        a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[a, b] >= -1e-9 * max(1.0, float(w.sum())):
            break
        row[a], row[b] = row[b], row[a]
        changed = True
    return changed


def improve(counts: RoutingCounts, device: np.ndarray, devices: int, alpha: float = 1.0, beta: float = 1.0,
            seconds: float = 60.0, max_binaries: int = 256) -> tuple[np.ndarray, int, bool]:
    """`device` [L, E] improved by one-layer moves (module doc) within `seconds`; returns it, the sweeps run and
    whether the last sweep changed nothing (a local optimum; False: the time ran out first)."""
    deadline = time.perf_counter() + seconds
    device = device.copy()
    best = objective(counts, device, devices, alpha, beta)[0]
    exact = counts.num_experts * devices <= max_binaries
    sweeps = 0
    while True:
        sweeps += 1
        improved = False
        for li in range(counts.num_layers):
            if swap_layer(counts, device, li, devices, alpha, beta):
                best, improved = objective(counts, device, devices, alpha, beta)[0], True
            for a in dict.fromkeys((0.0, alpha) if exact else (0.0,)):  # alpha 0: the linear assignment
                left = deadline - time.perf_counter()
                if left <= 0:
                    return device, sweeps, False
                new = layer_program(counts, device, li, devices, a, beta, left)
                if new is None:
                    continue
                trial = device.copy()
                trial[li] = new
                value = objective(counts, trial, devices, alpha, beta)[0]
                if value < best - 1e-9:
                    device, best, improved = trial, value, True
        if not improved:
            return device, sweeps, time.perf_counter() < deadline


def search(counts: RoutingCounts, devices: int, alpha: float = 1.0, beta: float = 1.0, seconds: float = 60.0,
           starts: int = 16, seed: int = 0, max_binaries: int = 256) -> tuple[np.ndarray, int, bool]:
    """The best placement [L, E] `improve` reaches from several starts (module doc) within `seconds`; returns it,
    the starts run and whether the final `improve` ended at a local optimum."""
    deadline = time.perf_counter() + seconds
    rng = np.random.default_rng(seed)
    slots = np.repeat(np.arange(devices), capacities(counts.num_experts, devices))
    best, best_value, ran = None, np.inf, 0
    for s in range(max(starts, 1)):
        start = greedy(counts, devices, alpha, beta) if s == 0 else \
            np.stack([rng.permutation(slots) for _ in range(counts.num_layers)])
        device, _, _ = improve(counts, start, devices, alpha, beta, deadline - time.perf_counter(), max_binaries=0)
        value = objective(counts, device, devices, alpha, beta)[0]
        ran += 1
        if value < best_value:
            best, best_value = device, value
        if time.perf_counter() >= deadline:
            return best, ran, False
    device, _, converged = improve(counts, best, devices, alpha, beta, deadline - time.perf_counter(), max_binaries)
    return device, ran, converged
