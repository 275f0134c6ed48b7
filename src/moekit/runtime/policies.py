"""Cache policies for experts: small objects that decide which resident expert to evict.

Every policy holds at most `capacity` keys (a key is any hashable; the store uses `(layer, expert)`):
`access(key) -> bool` records a use and says whether the key was resident; `insert(key) -> list` makes it resident
and returns the keys evicted to make room; `victim()` names the next key to go; `evict(key)` removes one;
`demote(key)` marks a resident key to be evicted before all others (a mispredicted prefetch, ExpertFlow).
`PerLayer` gives each layer its own quota and its own policy; the others are global.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence

import torch

from moekit.errors import ConfigError, UnknownNameError

Key = Hashable


class CacheFull(ConfigError):
    """Every resident key is protected: nothing can be evicted for a new one."""


class Policy:
    """Shared bookkeeping: the resident set, demoted keys, and a lazy min-heap of (priority, key)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ConfigError(f"cache capacity must be at least 1 expert, got {capacity}")
        self.capacity = capacity
        self.resident: set[Key] = set()
        self._demoted: OrderedDict[Key, None] = OrderedDict()
        self._heap: list[tuple] = []
        self._prio: dict[Key, tuple] = {}
        self._tie = itertools.count()
        self.clock = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def priority(self, key: Key) -> tuple:
        """Lower goes first."""
        raise NotImplementedError

    def _touch(self, key: Key) -> None:
        """Record a use (hit or miss) before the resident check."""

    def _arrive(self, key: Key) -> None:
        """Bookkeeping when a key becomes resident (after its use, if any, was recorded)."""

    def access(self, key: Key) -> bool:
        self.clock += 1
        self._touch(key)
        hit = key in self.resident
        if hit:
            self._demoted.pop(key, None)
            self._push(key)
        return hit

    def _push(self, key: Key) -> None:
        prio = self.priority(key)
        self._prio[key] = prio
        heapq.heappush(self._heap, (prio, next(self._tie), key))
        if len(self._heap) > 4 * len(self.resident) + 64:
            self._heap = [(p, next(self._tie), k) for k, p in self._prio.items()]
            heapq.heapify(self._heap)

    def victim(self, protect: Collection[Key] = ()) -> Key:
        """The next key to evict, never one in `protect` (keys the current step needs)."""
        demoted = [k for k in self._demoted if k not in protect]
        if demoted:
            return demoted[0]
        held = []
        try:
            while self._heap:
                prio, _, key = self._heap[0]
                if key in self.resident and self._prio.get(key) == prio:
                    if key not in protect:
                        return key
                    held.append(heapq.heappop(self._heap))
                else:
                    heapq.heappop(self._heap)
        finally:
            for item in held:
                heapq.heappush(self._heap, item)
        raise CacheFull(f"no key to evict: all {len(self.resident)} resident keys are needed by this step")

    def insert(self, key: Key, protect: Collection[Key] = ()) -> list[Key]:
        """Make `key` resident, evicting as needed but never a key in `protect`; returns the evicted keys (a
        prefetch inserts without `access`: it records no use)."""
        if key in self.resident:
            return []
        evicted = []
        while len(self.resident) >= self.capacity:
            v = self.victim(protect)
            self.evict(v)
            evicted.append(v)
        self.resident.add(key)
        self._arrive(key)
        self._push(key)
        return evicted

    def evict(self, key: Key) -> None:
        self.resident.discard(key)
        self._demoted.pop(key, None)
        self._prio.pop(key, None)

    def demote(self, key: Key) -> None:
        if key in self.resident:
            self._demoted[key] = None


class LRU(Policy):
    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.last: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self.last[key] = self.clock

    def _arrive(self, key: Key) -> None:
        self.last[key] = self.clock

    def priority(self, key: Key) -> tuple:
        return (self.last.get(key, self.clock),)


class LFU(Policy):
    """Least frequently used; counts survive eviction (expert popularity), ties go to the least recent."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.clock

    def _arrive(self, key: Key) -> None:
        self.last[key] = self.clock

    def priority(self, key: Key) -> tuple:
        return (self.count.get(key, 0), self.last.get(key, self.clock))


class LFUDA(LFU):
    """LFU with dynamic aging: K = age + min(count, cap); on eviction age <- K(victim), its count halves."""

    def __init__(self, capacity: int, cap: int = 12):
        super().__init__(capacity)
        self.cap = cap
        self.age = 0

    def priority(self, key: Key) -> tuple:
        return (self.age + min(self.count.get(key, 0), self.cap), self.last.get(key, self.clock))

    def evict(self, key: Key) -> None:
        prio = self._prio.get(key)
        if prio is not None and key not in self._demoted:
            self.age = prio[0]
        self.count[key] = self.count.get(key, 0) // 2
        super().evict(key)


class Belady(Policy):
    """Evict the key used farthest in the future (MIN): optimal for demand fetching, needs the whole sequence."""

    def __init__(self, capacity: int, future: Sequence[Key]):
        super().__init__(capacity)
        self.future = list(future)
        n = len(self.future)
        self._next = [n] * n  # _next[i]: the next position after i that uses future[i]
        seen: dict[Key, int] = {}
        for i in range(n - 1, -1, -1):
            self._next[i] = seen.get(self.future[i], n + 1)
            seen[self.future[i]] = i
        self._first = seen
        self._pos = -1
        self._next_use: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self._pos += 1
        if self._pos >= len(self.future) or self.future[self._pos] != key:
            raise ConfigError(f"Belady: access {self._pos} is {key!r}, its future said otherwise")
        self._next_use[key] = self._next[self._pos]

    def priority(self, key: Key) -> tuple:
        nxt = self._next_use.get(key, self._first.get(key, len(self.future) + 1))
        if nxt <= self._pos:
            nxt = len(self.future) + 1
        return (-nxt,)


class ActivationAware(Policy):
    """MoE-Infinity: a per-request expert activation matrix (EAM, counts [L, E]) is matched against the last
    `history` requests' (lowest 1 - mean cosine over the layers seen); residents are ranked by the matched
    request's and the current request's row-normalised counts, weighted by how soon their layer comes
    (1 - distance / (L + 1)), and by global frequency; the lowest goes. Keys are `(layer, expert)`."""

    def __init__(self, capacity: int, num_layers: int, num_experts: int, history: int = 32, eps: float = 1e-3):
        super().__init__(capacity)
        self.L, self.E, self.history, self.eps = num_layers, num_experts, history, eps
        self.current = torch.zeros(num_layers, num_experts)
        self.freq = torch.zeros(num_layers, num_experts)
        self.past: list[torch.Tensor] = []
        self.layer = 0

    def begin_request(self) -> None:
        """Close the current request: its EAM joins the history (the least matched one leaves when full)."""
        if self.current.sum() > 0:
            if len(self.past) >= self.history:
                self.past.pop(0)
            self.past.append(self.current)
        self.current = torch.zeros(self.L, self.E)

    def _touch(self, key: Key) -> None:
        layer, e = key
        self.current[layer, e] += 1
        self.freq[layer, e] += 1
        self.layer = layer

    @staticmethod
    def _rows(m: torch.Tensor) -> torch.Tensor:
        return m / m.sum(-1, keepdim=True).clamp_min(1e-12)

    def matched(self) -> torch.Tensor | None:
        """The past EAM nearest to the current request (None without history)."""
        if not self.past:
            return None
        seen = self.current.sum(-1) > 0
        if not seen.any():
            return self.past[-1]
        past = torch.stack(self.past)  # [C, L, E]
        cos = torch.nn.functional.cosine_similarity(past[:, seen], self.current[seen].unsqueeze(0), dim=-1)
        return self.past[int(cos.mean(-1).argmax())]

    def scores(self) -> torch.Tensor:  # [L, E], higher = keep
        dist = (torch.arange(self.L) - self.layer) % self.L
        topo = 1 - dist.float() / (self.L + 1)
        m = self.matched()
        want = self._rows(self.current) + (self._rows(m) if m is not None else 0) + self.eps
        return topo[:, None] * want * (1 + self._rows(self.freq))

    def victim(self, protect: Collection[Key] = ()) -> Key:
        demoted = [k for k in self._demoted if k not in protect]
        if demoted:
            return demoted[0]
        keys = [k for k in self.resident if k not in protect]
        if not keys:
            raise CacheFull(f"no key to evict: all {len(self.resident)} resident keys are needed by this step")
        layers, experts = zip(*keys, strict=True)
        vals = self.scores()[torch.tensor(layers), torch.tensor(experts)]
        return keys[int(vals.argmin())]

    def priority(self, key: Key) -> tuple:  # noqa: ARG002 (scores are recomputed at each victim())
        return (0,)

    def _push(self, key: Key) -> None:
        """Scores are recomputed at each victim(); no heap."""


class PerLayer(Policy):
    """One policy per layer with its own quota (`capacity` split evenly, the remainder to the first layers);
    keys are `(layer, expert)`."""

    def __init__(self, capacity: int, num_layers: int, make: Callable[[int], Policy]):
        if capacity < num_layers:
            raise ConfigError(f"a per-layer cache needs at least one expert per layer ({num_layers}), got {capacity}")
        super().__init__(capacity)
        quota = [capacity // num_layers + (i < capacity % num_layers) for i in range(num_layers)]
        self.layers = [make(q) for q in quota]

    def access(self, key: Key) -> bool:
        return self.layers[key[0]].access(key)

    def insert(self, key: Key, protect: Collection[Key] = ()) -> list[Key]:
        evicted = self.layers[key[0]].insert(key, protect)
        self.resident.add(key)
        self.resident.difference_update(evicted)
        return evicted

    def evict(self, key: Key) -> None:
        self.layers[key[0]].evict(key)
        self.resident.discard(key)

    def demote(self, key: Key) -> None:
        self.layers[key[0]].demote(key)

    def victim(self, protect: Collection[Key] = (), layer: int | None = None) -> Key:
        if layer is not None:
            return self.layers[layer].victim(protect)
        return next(p.victim(protect) for p in self.layers if set(p.resident) - set(protect))


POLICIES = ("lru", "lfu", "lfuda", "moe-infinity", "belady", "layer-lru", "layer-lfu", "layer-lfuda")


def make_policy(name: str, capacity: int, num_layers: int, num_experts: int,
                future: Sequence[Key] | None = None) -> Policy:
    """A policy by name (`POLICIES`); `belady` needs the future accesses."""
    simple = {"lru": LRU, "lfu": LFU, "lfuda": LFUDA}
    if name in simple:
        return simple[name](capacity)
    if name.startswith("layer-") and name[6:] in simple:
        return PerLayer(capacity, num_layers, simple[name[6:]])
    if name == "moe-infinity":
        return ActivationAware(capacity, num_layers, num_experts)
    if name == "belady":
        if future is None:
            raise ConfigError("policy 'belady' needs the future accesses: it runs in trace replay only")
        return Belady(capacity, future)
    raise UnknownNameError(f"unknown cache policy {name!r}; expected one of {', '.join(POLICIES)}")


def count_hits(policy: Policy, keys: Sequence[Key]) -> int:
    """Demand caching: each key is accessed, a miss inserts it. Returns the number of hits."""
    hits = 0
    for key in keys:
        if policy.access(key):
            hits += 1
        else:
            policy.insert(key)
    return hits
