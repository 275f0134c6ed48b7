"""Streams with drifts where they are asked for, and the prequential scores stream papers report.

`switch(concepts, positions, widths)` chains concepts as river's `ConceptDriftStream` nests them: at instance t,
drift j has happened with probability `sigmoid(4 (t - positions[j]) / widths[j])` (width 1: an abrupt switch at
the position). river computes `1 / (1 + exp(-4 (t - p) / w))` and overflows once `4 (p - t) / w` passes ~709
(narrow widths at large positions); `drift_probability` evaluates the same sigmoid without overflow.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from moekit.errors import ConfigError


def drift_probability(t: int, position: int, width: int) -> float:
    """P(the drift at `position` has happened by instance t): the logistic sigmoid of 4 (t - position) / width,
    exact for any magnitude (width <= 1 is a step at the position)."""
    if width <= 1:
        return 1.0 if t >= position else 0.0
    z = 4.0 * (t - position) / width
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # z < 0: exp(z) underflows to 0, never overflows
    return e / (1.0 + e)


def switch(concepts: list[Iterable[tuple[dict, Any]]], positions: list[int], widths: list[int] | int,
           seed: int = 0) -> Iterator[tuple[dict, Any]]:
    """Instances from `concepts[0]`, then `concepts[1]` from around `positions[0]`, and so on. Instance t comes
    from concept j+1 when drifts 0..j have happened at t (each decided by its own draw, as nested
    ConceptDriftStreams decide); a concept only advances when it supplies an instance. Ends when the concept
    asked for runs out."""
    if len(concepts) != len(positions) + 1:
        raise ConfigError(f"positions: expected {len(concepts) - 1} (one per drift between {len(concepts)} concepts), "
                          f"got {len(positions)}")
    widths = [widths] * len(positions) if isinstance(widths, int) else list(widths)
    if len(widths) != len(positions):
        raise ConfigError(f"widths: expected one per drift ({len(positions)}), got {len(widths)}")
    if any(b <= a for a, b in zip(positions, positions[1:], strict=False)) or any(p < 0 for p in positions):
        raise ConfigError(f"positions={positions}: expected increasing, non-negative instance indices")
    if any(w < 1 for w in widths):
        raise ConfigError(f"widths={widths}: expected widths >= 1 (1 is abrupt)")
    return _switched(concepts, positions, widths, seed)


def _switched(concepts: list[Iterable[tuple[dict, Any]]], positions: list[int], widths: list[int],
              seed: int) -> Iterator[tuple[dict, Any]]:
    rng = random.Random(seed)
    its = [iter(c) for c in concepts]
    t = 0
    while True:
        c = 0
        for pos, w in zip(positions, widths, strict=True):
            if rng.random() >= drift_probability(t, pos, w):
                break
            c += 1
        try:
            yield next(its[c])
        except StopIteration:
            return
        t += 1


class Prequential:
    """Test-then-train scores: accuracy, Cohen's kappa, kappa-m (against the majority class seen so far) and
    kappa-t (against predicting the previous label), each `(p - p_ref) / (1 - p_ref)`."""

    def __init__(self) -> None:
        self.n = 0
        self.correct = 0
        self.majority_correct = 0
        self.nochange_correct = 0
        self.seen: Counter = Counter()
        self.predicted: Counter = Counter()
        self.previous: Any = None

    def update(self, y: Any, y_pred: Any) -> None:
        if self.seen:
            self.majority_correct += self.seen.most_common(1)[0][0] == y
        self.nochange_correct += self.previous is not None and self.previous == y
        self.correct += y_pred == y
        self.n += 1
        self.seen[y] += 1
        self.predicted[y_pred] += 1
        self.previous = y

    @staticmethod
    def _kappa(p: float, p_ref: float) -> float | None:
        return None if p_ref >= 1 else (p - p_ref) / (1 - p_ref)

    def scores(self) -> dict[str, float | None]:
        if self.n == 0:
            return {"accuracy": None, "kappa": None, "kappa_m": None, "kappa_t": None}
        acc = self.correct / self.n
        chance = sum(self.seen[c] * self.predicted[c] for c in self.seen) / self.n**2
        return {"accuracy": acc, "kappa": self._kappa(acc, chance),
                "kappa_m": self._kappa(acc, self.majority_correct / self.n),
                "kappa_t": self._kappa(acc, self.nochange_correct / self.n)}
