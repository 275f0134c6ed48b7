"""Replay a routing trace over a placement: per-device load, all-to-all bytes per layer and an estimated time.

The trace is cut into steps of `step_tokens` consecutive tokens (one serving batch each). Every token has a home
device, where its attention runs and its hidden state lives: tokens are spread over the devices as data parallelism
spreads them (token t of a step goes to device t * N // step_tokens), or, with `follow=True`, a token's home at
layer l+1 is the device that ran its first (highest-weight) layer-l expert (MoETuner: the token stays where its
last expert ran). A token routed to expert e uses the copy on its home device when there is one, else copy
(t mod copies). Expert parallelism sends the token's hidden state (hidden_size x elem_bytes) to every remote expert
and the output back (the exchange `moekit.train.expert_parallel.ExpertParallelMoE` does; rows a device keeps for
itself are not sent).

Time model per layer and step (stated, every constant in `CostModel`):
    compute = max_d (assignments on d) * 6 * hidden * intermediate / flops      (gate, up, down: 3 matmuls)
    network = 2 * (latency + max_d max(bytes d sends, bytes d receives in the dispatch) / bandwidth)
              (dispatch, then the combine sends the same rows back)
    time    = compute + network
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moekit.serve.place import Placement, RoutingCounts, contiguous, cross_tokens


@dataclass
class CostModel:
    hidden_size: int
    intermediate_size: int
    elem_bytes: int = 2  # bf16 activations on the wire
    flops: float = 100e12  # sustained FLOP/s of one device on expert matmuls
    bandwidth: float = 50e9  # bytes/s each device sends (and receives) concurrently
    latency: float = 10e-6  # seconds per all-to-all


def _route(idx: np.ndarray, home: np.ndarray, copies: list[list[int]], devices: int) -> np.ndarray:
    """The device each assignment idx [T, k] runs on: the copy on the token's home device, else copy t mod n."""
    T, k = idx.shape
    n_copies = np.array([len(c) for c in copies])
    table = np.full((len(copies), max(n_copies)), -1)
    for e, c in enumerate(copies):
        table[e, :len(c)] = c
    rot = table[idx, (np.arange(T)[:, None] % n_copies[idx])]  # [T, k]
    local = np.zeros((len(copies), devices), bool)
    for e, c in enumerate(copies):
        local[e, c] = True
    on_home = local[idx, home[:, None].repeat(k, 1)]
    return np.where(on_home, home[:, None], rot)


def a2a_bytes(idx: np.ndarray, home: np.ndarray, where: np.ndarray, devices: int, row_bytes: int,
              mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sent [N], received [N]) bytes of one expert-parallel dispatch: every assignment idx [T, k] whose expert runs
    on a device where [T, k] other than the token's home [T] moves row_bytes there. The combine sends the same rows
    back (sent and received swap)."""
    real = np.ones(idx.shape, bool) if mask is None else mask.astype(bool)
    remote = real & (where != home[:, None])
    src = home[:, None].repeat(idx.shape[1], 1)[remote]
    dst = where[remote]
    return (np.bincount(src, minlength=devices).astype(np.int64) * row_bytes,
            np.bincount(dst, minlength=devices).astype(np.int64) * row_bytes)


def simulate(indices: list[np.ndarray], placement: Placement, cost: CostModel, *, step_tokens: int = 2048,
             follow: bool = False, masks: list[np.ndarray | None] | None = None) -> dict:
    """Replay per-layer expert ids [T, k] over `placement` (module doc). Per layer: load per device (summed over
    steps), bytes moved per step (dispatch + combine, all devices), imbalance (max over mean device load, mean over
    steps) and the estimated seconds; totals per step."""
    N = placement.devices
    masks = masks or [None] * len(indices)
    T = indices[0].shape[0]
    row = cost.hidden_size * cost.elem_bytes
    flop_per = 6 * cost.hidden_size * cost.intermediate_size
    steps = [(s, min(s + step_tokens, T)) for s in range(0, T, step_tokens)]
    layers = [{"load": np.zeros(N), "bytes": 0.0, "imbalance": 0.0, "seconds": 0.0}
              for _ in indices]
    for s, e in steps:
        n = e - s
        home = np.arange(n) * N // n
        for li, idx in enumerate(indices):
            m = None if masks[li] is None else masks[li][s:e]
            real = np.ones((n, idx.shape[1]), bool) if m is None else m.astype(bool)
            where = _route(idx[s:e], home, placement.copies[li], N)
            load = np.bincount(where[real], minlength=N).astype(float)
            sent, recv = a2a_bytes(idx[s:e], home, where, N, row, m)
            rec = layers[li]
            rec["load"] += load
            rec["bytes"] += 2 * sent.sum()
            rec["imbalance"] += load.max() / max(load.mean(), 1e-12) / len(steps)
            rec["seconds"] += (load.max() * flop_per / cost.flops
                               + 2 * (cost.latency + np.maximum(sent, recv).max() / cost.bandwidth))
            if follow:
                home = where[:, 0]
    per_step = sum(r["seconds"] for r in layers) / len(steps)
    return {"devices": N, "steps": len(steps), "step_tokens": step_tokens, "follow": follow,
            "seconds_per_step": per_step, "bytes_per_step": sum(r["bytes"] for r in layers) / len(steps),
            "layers": [{"load": r["load"].tolist(), "bytes_per_step": r["bytes"] / len(steps),
                        "imbalance": r["imbalance"], "seconds_per_step": r["seconds"] / len(steps)} for r in layers]}


def compare(indices: list[np.ndarray], counts: RoutingCounts, placement: Placement, cost: CostModel, *,
            step_tokens: int = 2048, masks: list[np.ndarray | None] | None = None) -> dict:
    """The placement against contiguous placement (same devices, no replicas): cross-device tokens, max device
    load, simulated bytes and time, with data-parallel homes and with tokens following their experts."""
    N = placement.devices
    base_dev = contiguous(counts.num_experts, counts.num_layers, N)
    base = Placement(N, base_dev, [[[int(d)] for d in row] for row in base_dev], int(np.bincount(base_dev[0]).max()))
    out = {"cost_model": asdict(cost)}
    for name, p in (("placed", placement), ("contiguous", base)):
        max_load = [float(np.bincount(p.device[li], counts.load[li], N).max()) for li in range(counts.num_layers)]
        out[name] = {"cross_tokens": float(cross_tokens(counts, p.device).sum()),
                     "max_device_load": sum(max_load),
                     "balanced_load": float(counts.load.sum() / N),
                     "load_lower_bound": float(sum(max(row.sum() / N, row.max()) for row in counts.load)),
                     "split": simulate(indices, p, cost, step_tokens=step_tokens, masks=masks),
                     "follow": simulate(indices, p, cost, step_tokens=step_tokens, follow=True, masks=masks)}
    a, b = out["placed"], out["contiguous"]
    out["cross_reduction"] = 1 - a["cross_tokens"] / b["cross_tokens"] if b["cross_tokens"] else 0.0
    out["load_over_balanced"] = a["max_device_load"] / a["balanced_load"] - 1
    out["load_over_lower_bound"] = a["max_device_load"] / a["load_lower_bound"] - 1
    out["follow_bytes_reduction"] = 1 - a["follow"]["bytes_per_step"] / max(b["follow"]["bytes_per_step"], 1e-12)
    out["speedup_split"] = b["split"]["seconds_per_step"] / a["split"]["seconds_per_step"]
    out["speedup_follow"] = b["follow"]["seconds_per_step"] / a["follow"]["seconds_per_step"]
    return out
