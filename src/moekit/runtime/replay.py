"""Replay a routing trace through a cache policy and budget, without running the model.

Tokens are taken in the order the model saw them; for each token, layer by layer, its k experts are accessed as
keys `(layer, expert)` (a miss reads the expert). With predictions, the predicted experts of a layer are
prefetched before the layer's real routing is known (they cost bytes, not misses), and those the real gate did
not choose are demoted: evicted before anything else. A new request (the trace's window) begins at every window
boundary (MoE-Infinity's activation matrix is per request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.runtime.policies import ActivationAware, CacheFull, make_policy


@dataclass
class Routes:
    """What replay needs from a trace: per layer the chosen experts [N, k] (-1 = no expert), request ids [N]."""

    indices: list[Tensor]
    request: Tensor
    num_experts: list[int]

    @classmethod
    def from_trace(cls, trace) -> Routes:
        """From a `moekit.inspect.trace.Trace` (padded slots, where the trace has a mask, become -1)."""
        indices = []
        for i in range(len(trace.layers)):
            idx = trace.indices(i).clone()
            mask = trace.mask(i)
            if mask is not None:
                idx[~mask] = -1
            indices.append(idx)
        return cls(indices, trace.window, list(trace.num_experts))

    @property
    def num_tokens(self) -> int:
        return int(self.request.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    def split(self, fraction: float) -> tuple[Routes, Routes]:
        """The first `fraction` of the requests (training) and the rest (held out)."""
        ids = self.request.unique()
        cut = ids[max(1, int(len(ids) * fraction)) - 1]
        first = self.request <= cut
        return (Routes([x[first] for x in self.indices], self.request[first], self.num_experts),
                Routes([x[~first] for x in self.indices], self.request[~first], self.num_experts))

    def keys(self) -> list[tuple[int, int]]:
        """The demand access sequence, token-major then layer."""
        rows = [x.tolist() for x in self.indices]
        return [(i, e) for t in range(self.num_tokens) for i in range(self.num_layers) for e in rows[i][t] if e >= 0]


def capacity_of(budget: float | int, routes: Routes) -> int:
    """A budget as a number of experts: an int is a count, a float in (0, 1] a fraction of all experts."""
    total = sum(routes.num_experts)
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"budget fraction must be in (0, 1], got {budget}")
        return max(1, round(budget * total))
    if budget < 1:
        raise ConfigError(f"budget must be at least 1 expert, got {budget}")
    return min(int(budget), total)


def replay(routes: Routes, policy: str, budget: float | int, *, predictions: Sequence[Tensor] | None = None,
           expert_bytes: int = 1) -> dict:
    """Hit rate (overall and per layer), bytes read per token and prefetch precision of one policy at one budget.

    `predictions[i]` [N, p]: the experts prefetched for layer i of each token (-1 = none)."""
    cap = capacity_of(budget, routes)
    L = routes.num_layers
    keys = routes.keys() if policy == "belady" else None
    pol = make_policy(policy, cap, L, max(routes.num_experts), future=keys)
    rows = [x.tolist() for x in routes.indices]
    pred = [p.tolist() for p in predictions] if predictions is not None else None
    if pred is not None and (len(pred) != L or any(len(p) != routes.num_tokens for p in pred)):
        raise ConfigError(f"predictions: expected {L} layers of {routes.num_tokens} tokens")
    req = routes.request.tolist()
    hits, access = [0] * L, [0] * L
    fetched = prefetched = useful = 0
    for t in range(routes.num_tokens):
        if t and req[t] != req[t - 1] and isinstance(pol, ActivationAware):
            pol.begin_request()
        for i in range(L):
            real = {e for e in rows[i][t] if e >= 0}
            wanted = {(i, e) for e in pred[i][t] if e >= 0} if pred is not None else set()
            guess = {e for (_, e) in wanted if (i, e) not in pol}
            for e in guess:
                try:
                    pol.insert((i, e), protect=wanted)
                except CacheFull:  # more predicted than fits: the rest is not prefetched
                    break
                prefetched += 1
                useful += e in real
            ahead = {(i, e) for e in real}  # a step never evicts an expert it is still to use
            for e in rows[i][t]:
                if e < 0:
                    continue
                ahead.discard((i, e))
                access[i] += 1
                if pol.access((i, e)):
                    hits[i] += 1
                else:
                    try:
                        pol.insert((i, e), protect=ahead)
                    except CacheFull:  # the layer needs more experts than fit: it streams them
                        pol.insert((i, e))
                    fetched += 1
            for e in guess - real:  # mispredicted: first to go
                pol.demote((i, e))
    n = max(routes.num_tokens, 1)
    return {"policy": policy, "capacity": cap, "budget_fraction": cap / sum(routes.num_experts),
            "hit_rate": sum(hits) / max(sum(access), 1),
            "hit_rate_per_layer": [h / max(a, 1) for h, a in zip(hits, access, strict=True)],
            "misses": sum(access) - sum(hits), "prefetched": prefetched,
            "prefetch_precision": useful / prefetched if prefetched else None,
            "bytes_read": (fetched + prefetched) * expert_bytes,
            "bytes_per_token": (fetched + prefetched) * expert_bytes / n}


def gap_closed(result: dict, lru: dict, belady: dict) -> float | None:
    """Share of the LRU-to-Belady hit-rate gap a result closes (None when there is no gap)."""
    gap = belady["hit_rate"] - lru["hit_rate"]
    return None if gap <= 0 else (result["hit_rate"] - lru["hit_rate"]) / gap


def compare(routes: Routes, policies: Sequence[str], budgets: Sequence[float | int], *,
            predictions: dict[str, Sequence[Tensor]] | None = None, expert_bytes: int = 1) -> list[dict]:
    """Every policy (and every prediction source, run with LRU) at every budget, with `gap_closed`."""
    out = []
    for budget in budgets:
        base = replay(routes, "lru", budget, expert_bytes=expert_bytes)
        best = replay(routes, "belady", budget, expert_bytes=expert_bytes)
        rows = [replay(routes, p, budget, expert_bytes=expert_bytes) if p not in ("lru", "belady")
                else (base if p == "lru" else best) for p in policies]
        for name, pred in (predictions or {}).items():
            r = replay(routes, "lru", budget, predictions=pred, expert_bytes=expert_bytes)
            r["prefetch"] = name
            rows.append(r)
        for r in rows:
            r.setdefault("prefetch", "none")
            r["budget"] = budget
            r["gap_closed"] = gap_closed(r, base, best)
        out.extend(rows)
    return out


def oracle_predictions(routes: Routes) -> list[Tensor]:
    """Perfect predictions (each layer's real experts): the upper end for a predictor, used by tests."""
    return [x.clone() for x in routes.indices]


def token_routes(routes: Routes) -> Tensor:
    """[N, L, max E] multi-hot routing paths, the predictor's training target."""
    out = torch.zeros(routes.num_tokens, routes.num_layers, max(routes.num_experts))
    for i, x in enumerate(routes.indices):
        valid = x >= 0
        rows = torch.arange(routes.num_tokens).unsqueeze(1).expand_as(x)
        out[rows[valid], i, x[valid]] = 1
    return out
