"""DriftMoE (Aspis et al., 2025): a small neural router co-trained online with a pool of Hoeffding-tree experts.

Per labelled instance (x, y):
1. every expert predicts x before it learns; the router's target is the multi-hot **correctness mask**
   `m[e] = 1` where expert e predicts y (if none does, the one expert giving y the highest probability);
2. (x, m) joins a buffer; every `batch_size` instances the router takes one Adam step of binary cross-entropy
   between its logits and the masks of the buffer (the paper: 256);
3. the experts learn: `mode="data"`, the router's top-k experts for x (experts specialise on data regimes);
   `mode="task"`, every expert, one-vs-rest for its class (expert c learns `y == c`; a new class adds an expert and
   a router output). In the task variant the mask reduces to the one-hot of y: only expert y names y.

Prediction: `mode="data"` answers with the router's top-1 expert (the next one if it has seen nothing yet);
`mode="task"` scores class c by softmax(router)[c] * P_c(y == c) (moekit's choice: the paper's figure names
the router's top-1; the product lets a confident tree correct a wrong router).

Features: the experts see x as given (river trees handle missing and nominal features). The router needs numbers:
its inputs are the features of the first instance, in that order, standardised with running means and variances;
a feature missing later reads as its running mean, a feature first seen later is used by the experts only, and a
non-numeric value is refused (one-hot encode it first, e.g. `river.preprocessing.OneHotEncoder`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from river import base, tree

from moekit.errors import ConfigError, ShapeError

MODES = ("data", "task")


class _Router(torch.nn.Module):
    """in -> 256 -> 128 -> E, ReLU, dropout (the paper's router)."""

    def __init__(self, n_in: int, n_out: int, hidden: tuple[int, int], dropout: float) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(n_in, hidden[0]), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                        torch.nn.Linear(hidden[0], hidden[1]), torch.nn.ReLU(),
                                        torch.nn.Dropout(dropout))
        self.head = torch.nn.Linear(hidden[1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, F] -> logits [B, E]
        return self.head(self.body(x))

    def grow(self) -> None:
        """One more output (a new class's expert in the task variant); the old outputs keep their weights."""
        old = self.head
        new = torch.nn.Linear(old.in_features, old.out_features + 1)
        with torch.no_grad():
            new.weight[:-1].copy_(old.weight)
            new.bias[:-1].copy_(old.bias)
        self.head = new


class DriftMoE(base.Classifier):
    """A river classifier: `learn_one`, `predict_one`, `predict_proba_one`, usable with
    `river.evaluate.progressive_val_score` like any river model.

    Parameters
    ----------
    n_experts
        Experts in the data variant (the paper: 12). The task variant starts with one expert per class in `classes`
        and adds one per new class; `n_experts` is ignored there.
    mode
        "data" (experts specialise on data regimes, top-k updates) or "task" (one-vs-rest expert per class).
    top_k
        Experts that learn each instance in the data variant (the paper: 3).
    expert
        The expert template, cloned per expert (default: HoeffdingTreeClassifier(grace_period=50, delta=1e-7)).
    batch_size, lr, hidden, dropout
        Router training: one Adam step per `batch_size` instances (256, 2e-3, (256, 128), 0.2 in the paper).
    classes
        Labels known in advance (the task variant builds their experts at once); others are added when seen.
    seed
        Seeds the router's initialisation and dropout.
    """

    def __init__(self, n_experts: int = 12, mode: str = "data", top_k: int = 3, expert: base.Classifier | None = None,
                 batch_size: int = 256, lr: float = 2e-3, hidden: tuple[int, int] = (256, 128), dropout: float = 0.2,
                 classes: list | None = None, seed: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "data" and (not isinstance(n_experts, int) or n_experts < 1):
            raise ConfigError(f"n_experts={n_experts!r}: expected a positive integer")
        if mode == "data" and not 1 <= top_k <= n_experts:
            raise ConfigError(f"top_k={top_k!r}: expected 1 <= top_k <= n_experts ({n_experts})")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout={dropout!r}: expected 0 <= dropout < 1")
        self.n_experts = n_experts
        self.mode = mode
        self.top_k = top_k
        self.expert = expert
        self.batch_size = batch_size
        self.lr = lr
        self.hidden = hidden
        self.dropout = dropout
        self.classes = classes
        self.seed = seed
        template = expert if expert is not None else tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-7)
        self._template = template
        self.labels: list = list(dict.fromkeys(classes or []))  # task variant: expert i answers labels[i]
        n_start = n_experts if mode == "data" else len(self.labels)
        self.experts: list[base.Classifier] = [template.clone() for _ in range(n_start)]
        self.features: list | None = None  # router input order, fixed by the first instance
        self._router: _Router | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._rng = torch.Generator().manual_seed(seed)
        self._count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._buffer_x: list[np.ndarray] = []
        self._buffer_mask: list[np.ndarray] = []
        self._cache: tuple[dict, int, np.ndarray] | None = None  # (x, router version, logits)
        self._version = 0
        self._weights: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self._probas: tuple[dict | None, dict[int, dict]] = (None, {})  # (x, expert -> its probabilities for x)
        self.router_steps = 0
        self.last_mask: np.ndarray | None = None  # the correctness mask of the last learned instance
        self.last_learners: list[int] = []  # the experts that learned the last instance

    @property
    def _multiclass(self) -> bool:
        return True

    # --- router input ---------------------------------------------------------------------------------------------
    def _vector(self, x: dict) -> np.ndarray:
        if not isinstance(x, dict):
            raise ShapeError(f"x: expected a dict of features, got {type(x).__name__}")
        if self.features is None:
            return np.zeros(0)
        out = np.empty(len(self.features))
        for i, name in enumerate(self.features):
            v = x.get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out[i] = self._mean[i] if self._mean is not None else 0.0
            elif isinstance(v, bool | int | float | np.number):
                out[i] = float(v)
            else:
                raise ShapeError(f"feature {name!r} = {v!r}: DriftMoE's router expects numbers; encode it first "
                                 "(e.g. river.preprocessing.OneHotEncoder)")
        return out

    def _standardise(self, v: np.ndarray) -> np.ndarray:
        if self._count < 2:
            return np.zeros_like(v, dtype=np.float32)
        std = np.sqrt(self._m2 / (self._count - 1))
        return ((v - self._mean) / np.where(std > 0, std, 1.0)).astype(np.float32)

    def _observe(self, v: np.ndarray) -> None:  # Welford's running mean and variance
        self._count += 1
        delta = v - self._mean
        self._mean += delta / self._count
        self._m2 += delta * (v - self._mean)

    def _start(self, x: dict) -> None:
        self.features = list(x)
        n = len(self.features)
        self._mean, self._m2 = np.zeros(n), np.zeros(n)
        self._vector(x)  # refuse non-numeric features before anything is built
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._router = _Router(n, max(len(self.experts), 1), self.hidden, self.dropout)
        self._opt = torch.optim.Adam(self._router.parameters(), lr=self.lr)

    def router_logits(self, x: dict) -> np.ndarray:
        """The router's logits for x, one per expert (zeros before the first instance was learned)."""
        v = self._vector(x)
        if self._router is None:
            return np.zeros(len(self.experts))
        if self._cache is not None and self._cache[1] == self._version and self._cache[0] == x:
            return self._cache[2]
        if self._weights is None or self._weights[0] != self._version:  # numpy copies: a 1-row torch call costs more
            layers = [self._router.body[0], self._router.body[3], self._router.head]
            self._weights = (self._version, [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                                             for m in layers])
        h = self._standardise(v)
        for i, (w, b) in enumerate(self._weights[1]):  # eval mode: dropout off
            h = h @ w + b
            if i < 2:
                h = np.maximum(h, 0)
        logits = h
        self._cache = (dict(x), self._version, logits)
        return logits

    # --- river API ------------------------------------------------------------------------------------------------
    def predict_proba_one(self, x: dict) -> dict:
        logits = self.router_logits(x)
        if self.mode == "task":
            if not self.labels:
                return {}
            gate = np.exp(logits - logits.max())
            gate /= gate.sum()
            scores = {c: float(g) * e.predict_proba_one(x).get(True, 0.0)
                      for c, g, e in zip(self.labels, gate, self.experts, strict=True)}
            total = sum(scores.values())
            if total <= 0:
                return {c: float(g) for c, g in zip(self.labels, gate, strict=True)}
            return {c: s / total for c, s in scores.items()}
        for e in np.argsort(-logits, kind="stable"):
            proba = self._expert_proba(int(e), x)
            if proba and sum(proba.values()) > 0:
                return proba
        return {}

    def learn_one(self, x: dict, y: Any) -> None:
        if y is None:
            raise ShapeError("y: expected a label, got None")
        if self.features is None:
            self._start(x)
        if self.mode == "task" and y not in self.labels:
            self.labels.append(y)
            self.experts.append(self._template.clone())
            self._cache = None
            if len(self.experts) > self._router.head.out_features:
                self._router.grow()
                self._opt = torch.optim.Adam(self._router.parameters(), lr=self.lr)
                self._buffer_x.clear()
                self._buffer_mask.clear()
            self._version += 1
        v = self._vector(x)
        logits = self.router_logits(x)
        mask = self.correctness_mask(x, y)
        self._observe(v)
        self._buffer_x.append(v)
        self._buffer_mask.append(mask)
        if len(self._buffer_x) >= self.batch_size:
            self._router_step()
        if self.mode == "data":
            learners = [int(e) for e in np.argsort(-logits, kind="stable")[: self.top_k]]
            for e in learners:
                self.experts[e].learn_one(x, y)
        else:
            learners = list(range(len(self.experts)))
            for label, e in zip(self.labels, self.experts, strict=True):
                e.learn_one(x, y == label)
        self._probas = (None, {})
        self.last_mask, self.last_learners = mask, learners

    def correctness_mask(self, x: dict, y: Any) -> np.ndarray:
        """The router's target for (x, y): 1 for every expert whose prediction of x is y; if none, 1 for the expert
        giving y the highest probability (the first such). Task variant: the one-hot of y's expert."""
        mask = np.zeros(len(self.experts), dtype=np.float32)
        if self.mode == "task":
            mask[self.labels.index(y)] = 1.0
            return mask
        probas = [self._expert_proba(i, x) for i in range(len(self.experts))]
        for i, p in enumerate(probas):
            if p and max(p, key=p.get) == y and p[y] > 0:
                mask[i] = 1.0
        if not mask.any():
            mask[int(np.argmax([p.get(y, 0.0) for p in probas]))] = 1.0
        return mask

    def _expert_proba(self, i: int, x: dict) -> dict:
        """Expert i's probabilities for x, remembered until an expert learns (progressive validation asks the top-1
        expert in predict_one and every expert again in learn_one)."""
        if self._probas[0] != x:
            self._probas = (dict(x), {})
        if i not in self._probas[1]:
            self._probas[1][i] = self.experts[i].predict_proba_one(x)
        return self._probas[1][i]

    def _router_step(self) -> None:
        xs = np.stack([self._standardise(v) for v in self._buffer_x])
        n_out = self._router.head.out_features
        masks = np.zeros((len(self._buffer_mask), n_out), dtype=np.float32)
        for i, m in enumerate(self._buffer_mask):
            masks[i, : len(m)] = m
        self._buffer_x.clear()
        self._buffer_mask.clear()
        self._router.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._rng)))
            logits = self._router(torch.from_numpy(xs))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(masks))
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
        self.router_steps += 1
        self._version += 1
