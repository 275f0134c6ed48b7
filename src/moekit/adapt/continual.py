"""Continual experts for task sequences with unknown boundaries: TAME and SEMA, and the task sequence they run on.

**TAME** (Task-Agnostic continual learning using Multiple Experts): one expert network learns the stream at a
time. `LossJumpDetector` watches its mini-batch loss (measured before each update): a one-sided Welch t-test of
the last `recent` losses against the `reference` losses before them fires when p < `alpha`. Then every expert is
scored on the batch; the best is switched to if its loss is within its usual range (below the mean + `z` std of
the losses it had when it was last left), else a new expert is spawned. The expert left behind is pruned online:
its `prune` smallest-magnitude weights are zeroed (and stay zero if it is switched back to) and it is frozen. A
selector network (pruned the same way halfway through its training), trained on a small buffer
of (x, expert) pairs drawn uniformly from the stream (reservoir sampling), sends each test input to an expert.

**SEMA** (Self-Expansion of pre-trained models with Mixture of Adapters): a frozen pre-trained backbone; adapters
(bottlenecks added to its first layer's pre-activation), each with a representation descriptor (a linear
autoencoder of the inputs it was trained on, with the mean and std of its reconstruction error). A batch whose
error z-score is above `z` for every descriptor, `patience` batches running, is a shift no adapter handles: a
new adapter and descriptor are added, the older ones frozen, and the weighting router (softmax over adapters)
grows one output (older rows frozen). Otherwise the batch trains the adapter whose descriptor fits it best.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.errors import ConfigError


class LossJumpDetector:
    """`update(loss) -> bool`: True when the last `recent` losses are significantly above the `reference`
    losses before them (one-sided Welch t-test, p < alpha). Needs recent + reference losses first."""

    def __init__(self, reference: int = 50, recent: int = 10, alpha: float = 1e-4):
        if reference < 2 or recent < 2:
            raise ConfigError(f"reference={reference}, recent={recent}: expected at least 2 losses in each window")
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha={alpha}: expected a significance level in (0, 1)")
        self.reference, self.recent, self.alpha = reference, recent, alpha
        self.losses: deque[float] = deque(maxlen=reference + recent)
        self.last_p = 1.0

    def reset(self) -> None:
        self.losses.clear()

    def update(self, loss: float) -> bool:
        self.losses.append(float(loss))
        if len(self.losses) < self.reference + self.recent:
            return False
        seq = list(self.losses)
        ref, new = seq[: self.reference], seq[self.reference:]
        if np.std(ref) == 0 and np.std(new) == 0:
            self.last_p = 0.0 if np.mean(new) > np.mean(ref) else 1.0
        else:
            self.last_p = float(stats.ttest_ind(new, ref, equal_var=False, alternative="greater").pvalue)
        return self.last_p < self.alpha

    def typical(self) -> tuple[float, float]:
        """(mean, std) of the reference losses (the expert's usual range)."""
        ref = list(self.losses)[: self.reference] or [math.inf]
        return float(np.mean(ref)), float(np.std(ref))


def prune_masks(module: nn.Module, fraction: float) -> list[tuple[Tensor, Tensor]]:
    """Zero the `fraction` smallest-magnitude entries of each weight matrix; returns (weight, keep mask) pairs."""
    masks = []
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and fraction > 0:
                cut = p.abs().flatten().kthvalue(max(1, int(fraction * p.numel()))).values
                keep = p.abs() > cut
                p.mul_(keep)
                masks.append((p, keep))
    return masks


def apply_masks(masks: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for p, keep in masks:
            p.mul_(keep)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class TAME:
    def __init__(self, d_in: int, n_classes: int, hidden: int = 64, lr: float = 1e-3, buffer: int = 500,
                 prune: float = 0.5, z: float = 3.0, detector: LossJumpDetector | None = None, seed: int = 0):
        if not 0 <= prune < 1:
            raise ConfigError(f"prune={prune}: expected a fraction in [0, 1)")
        if buffer < 1:
            raise ConfigError(f"buffer={buffer}: expected a positive number of samples")
        self.d_in, self.n_classes, self.hidden, self.lr, self.prune, self.z = d_in, n_classes, hidden, lr, prune, z
        self.detector = detector or LossJumpDetector()
        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.experts: list[nn.Module] = []
        self.typical: list[tuple[float, float]] = []
        self.current = self._spawn()
        self.selector = mlp(d_in, hidden, 1)
        self.buffer_size, self.buffer, self.seen = buffer, [], 0
        self.events: list[tuple[int, str, int]] = []  # (batch, "spawn" | "switch", expert)
        self.masks: dict[int, list[tuple[Tensor, Tensor]]] = {}  # expert -> (weight, keep mask) after pruning
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=self.detector.reference + self.detector.recent)
        self.batches = 0

    def _spawn(self) -> int:
        self.experts.append(mlp(self.d_in, self.hidden, self.n_classes))
        self.typical.append((math.inf, 0.0))
        self.opt = torch.optim.Adam(self.experts[-1].parameters(), lr=self.lr)
        return len(self.experts) - 1

    def _leave(self, e: int) -> None:
        """Online pruning of the expert left behind: zero its smallest weights (kept at zero if it is switched back
        to), freeze it. Its usual range is its loss as pruned on the detector's reference batches (the task it
        leaves): pruning raises the loss, and the range measured before it would make a recurring task look new."""
        self.masks[e] = prune_masks(self.experts[e], self.prune)
        self.experts[e].requires_grad_(False)
        reference = list(self.recent)[: -self.detector.recent]
        with torch.no_grad():
            losses = [float(F.cross_entropy(self.experts[e](x), y)) for x, y in reference]
        self.typical[e] = (float(np.mean(losses)), float(np.std(losses))) if losses else self.detector.typical()

    def observe(self, x: Tensor, y: Tensor) -> float:
        """One mini-batch of the stream: detect, switch or spawn, train the current expert, fill the buffer."""
        expert = self.experts[self.current]
        with torch.no_grad():
            loss = float(F.cross_entropy(expert(x), y))
        self.recent.append((x, y))
        if self.detector.update(loss):
            with torch.no_grad():
                losses = [float(F.cross_entropy(e(x), y)) for e in self.experts]
            best = int(np.argmin(losses))
            mean, std = self.typical[best]
            self._leave(self.current)
            if best != self.current and losses[best] <= mean + self.z * max(std, 1e-3):
                self.current = best
                for p in self.experts[best].parameters():
                    p.requires_grad_(True)
                self.opt = torch.optim.Adam(self.experts[best].parameters(), lr=self.lr)
                self.events.append((self.batches, "switch", best))
            else:
                self.current = self._spawn()
                self.events.append((self.batches, "spawn", self.current))
            self.detector.reset()
            self.recent.clear()
            expert = self.experts[self.current]
        out = F.cross_entropy(expert(x), y)
        self.opt.zero_grad()
        out.backward()
        self.opt.step()
        apply_masks(self.masks.get(self.current, []))
        for row in x:  # reservoir: every sample seen so far is in the buffer with the same probability
            self.seen += 1
            if len(self.buffer) < self.buffer_size:
                self.buffer.append((row, self.current))
            elif (j := self.rng.randrange(self.seen)) < self.buffer_size:
                self.buffer[j] = (row, self.current)
        self.batches += 1
        return loss

    def fit_selector(self, epochs: int = 50) -> None:
        """Train the selector on the buffer; halfway, prune `prune` of its weights and train on with them at 0."""
        self.selector = mlp(self.d_in, self.hidden, len(self.experts))
        opt = torch.optim.Adam(self.selector.parameters(), lr=1e-3)
        xs = torch.stack([r for r, _ in self.buffer])
        ids = torch.tensor([e for _, e in self.buffer])
        masks: list[tuple[Tensor, Tensor]] = []
        for epoch in range(epochs):
            if epoch == epochs // 2:
                masks = prune_masks(self.selector, self.prune)
            for idx in torch.randperm(len(xs)).split(64):
                loss = F.cross_entropy(self.selector(xs[idx]), ids[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                apply_masks(masks)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        chosen = self.selector(x).argmax(-1)
        out = torch.empty(len(x), dtype=torch.long)
        for e in chosen.unique().tolist():
            rows = chosen == e
            out[rows] = self.experts[e](x[rows]).argmax(-1)
        return out


class SEMA:
    def __init__(self, backbone: nn.Sequential, d_in: int, rank: int = 16, code: int = 8, z: float = 5.0,
                 patience: int = 3, lr: float = 1e-3, seed: int = 0):
        torch.manual_seed(seed)
        self.backbone = backbone.requires_grad_(False)
        self.first: nn.Linear = backbone[0]
        self.d_in, self.rank, self.code, self.z, self.patience, self.lr = d_in, rank, code, z, patience, lr
        self.adapters = nn.ModuleList()
        self.descriptors = nn.ModuleList()
        self.desc_stats: list[tuple[float, float]] = []
        self.errors: list[list[float]] = []  # per adapter: its descriptor's recent per-sample errors
        self.router: nn.Linear | None = None
        self.frozen_rows = 0
        self.strikes = 0
        self.expansions: list[int] = []
        self.batches = 0
        self.active = self._expand()

    def _expand(self) -> int:
        for m in (*self.adapters, *self.descriptors):
            m.requires_grad_(False)
        self.adapters.append(nn.Sequential(nn.Linear(self.d_in, self.rank), nn.ReLU(),
                                           nn.Linear(self.rank, self.first.out_features)))
        nn.init.zeros_(self.adapters[-1][2].weight)
        self.descriptors.append(nn.Sequential(nn.Linear(self.d_in, self.code), nn.Linear(self.code, self.d_in)))
        self.desc_stats.append((math.inf, 0.0))
        self.errors.append([])
        old = self.router
        self.router = nn.Linear(self.d_in, len(self.adapters))
        if old is not None:
            with torch.no_grad():
                self.router.weight[:-1].copy_(old.weight)
                self.router.bias[:-1].copy_(old.bias)
        self.frozen_rows = len(self.adapters) - 1
        self.expansions.append(self.batches)
        return len(self.adapters) - 1

    def _params(self) -> list[Tensor]:
        return [*self.adapters[self.active].parameters(), *self.descriptors[self.active].parameters(),
                *self.router.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        g = torch.softmax(self.router(x), dim=-1)  # [B, A]
        shift = sum(g[:, i:i + 1] * a(x) for i, a in enumerate(self.adapters))
        h = self.backbone[1](self.first(x) + shift)
        return self.backbone[2:](h)

    def descriptor_z(self, x: Tensor) -> list[float]:
        """Per descriptor: z-score of the batch's mean reconstruction error against its training errors."""
        zs = []
        with torch.no_grad():
            for d, (mean, std) in zip(self.descriptors, self.desc_stats, strict=True):
                err = float(((d(x) - x) ** 2).mean())
                zs.append((err - mean) / max(std / math.sqrt(len(x)), 1e-8) if math.isfinite(mean) else -math.inf)
        return zs

    def observe(self, x: Tensor, y: Tensor) -> None:
        """One mini-batch: detect a shift (expand after `patience` shifted batches; the shifted batches train
        nothing), else train the best-fitting adapter, its descriptor and the router's newest row."""
        zs = self.descriptor_z(x)
        settled = [i for i, s in enumerate(zs) if math.isfinite(self.desc_stats[i][0])]
        self.batches += 1
        if self.active in settled and all(zs[i] > self.z for i in settled):
            self.strikes += 1
            if self.strikes < self.patience:
                return
            self.active, self.strikes = self._expand(), 0
        else:
            self.strikes = 0
            if self.active in settled:
                self.active = min(settled, key=lambda i: zs[i])
        self.adapters[self.active].requires_grad_(True)
        self.descriptors[self.active].requires_grad_(True)
        opt = torch.optim.Adam(self._params(), lr=self.lr)
        errs = ((self.descriptors[self.active](x) - x) ** 2).mean(-1)  # [B]
        loss = F.cross_entropy(self.forward(x), y) + errs.mean()
        opt.zero_grad()
        loss.backward()
        if self.frozen_rows:
            self.router.weight.grad[: self.frozen_rows] = 0
            self.router.bias.grad[: self.frozen_rows] = 0
        opt.step()
        mine = self.errors[self.active] = (self.errors[self.active] + errs.detach().tolist())[-500:]
        if len(mine) >= 4 * len(x):  # settled once it has seen a few batches
            self.desc_stats[self.active] = (float(np.mean(mine)), float(np.std(mine)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x).argmax(-1)


@dataclass
class TaskSequence:
    """Tasks' (x, y) train and test splits; `order` lists the task of each segment (tasks may recur)."""

    train: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    order: list[int]
    n_classes: int = 10
    names: list[str] | None = None


def permuted_digits(n_tasks: int = 3, order: list[int] | None = None, seed: int = 0) -> TaskSequence:
    """scikit-learn's bundled 8x8 digits (no download); task k = a fixed pixel permutation (task 0 the identity)."""
    from sklearn.datasets import load_digits

    order = order if order is not None else list(range(n_tasks))
    if not order or min(order) < 0 or max(order) >= n_tasks:
        raise ConfigError(f"order={order}: expected task indices in [0, {n_tasks})")
    data = load_digits()
    x, y = torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)
    cut = int(0.8 * len(x))
    perms = [torch.arange(x.shape[1])] + [torch.randperm(x.shape[1], generator=gen) for _ in range(n_tasks - 1)]
    train = [(x[idx[:cut]][:, p], y[idx[:cut]]) for p in perms]
    test = [(x[idx[cut:]][:, p], y[idx[cut:]]) for p in perms]
    return TaskSequence(train, test, order)


def byte_features(data: bytes, context: int = 3, buckets: int = 64) -> tuple[Tensor, Tensor]:
    """Next-byte prediction: x = one-hot of each of the `context` previous bytes modulo `buckets` (concatenated,
    [N, context * buckets]), y = the next byte [N] (256 classes)."""
    arr = torch.tensor(list(data), dtype=torch.long)
    n = len(arr) - context
    if n < 1:
        raise ConfigError(f"data: expected more than {context} bytes, got {len(arr)}")
    x = torch.zeros(n, context * buckets)
    rows = torch.arange(n)
    for j in range(context):
        x[rows, j * buckets + arr[j:j + n] % buckets] = 1.0
    return x, arr[context:]


def corpus_domains(order: list[int] | None = None, samples: int = 20_000, seed: int = 0) -> TaskSequence:
    """moekit-tiny's held-out corpus as a domain sequence of next-byte tasks: task 0 prose, task 1 code (default
    order prose, code, prose, code). Each domain's documents are joined and split 80/20 by position; `samples`
    training positions per domain are drawn (seeded), and a quarter as many test positions."""
    from moekit.data import default_documents

    order = order if order is not None else [0, 1, 0, 1]
    if not order or min(order) < 0 or max(order) > 1:
        raise ConfigError(f"order={order}: expected task indices in [0, 2) (0 prose, 1 code)")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for domain in ("prose", "code"):
        text = "\n".join(d.text for d in default_documents() if d.domain == domain).encode()
        cut = int(0.8 * len(text))
        for part, n, out in ((text[:cut], samples, train), (text[cut:], max(1, samples // 4), test)):
            x, y = byte_features(part)
            idx = torch.randperm(len(x), generator=gen)[:n]
            out.append((x[idx], y[idx]))
    return TaskSequence(train, test, order, n_classes=256, names=["prose", "code"])


def sea_concepts(order: list[int] | None = None, samples: int = 5_000, noise: float = 0.1,
                 seed: int = 0) -> TaskSequence:
    """river's SEA generator as a task sequence: task k = SEA function k (4 concepts of the drift bench's SEA
    streams), x = the 3 features scaled to [0, 1], y = the label; default order 0 1 2 3 0 1 2 3."""
    from river.datasets import synth

    order = order if order is not None else [0, 1, 2, 3, 0, 1, 2, 3]
    if not order or min(order) < 0 or max(order) > 3:
        raise ConfigError(f"order={order}: expected SEA functions in [0, 4)")
    train, test = [], []
    for k in range(4):
        rows = list(synth.SEA(variant=k, noise=noise, seed=seed + k).take(samples + samples // 4))
        x = torch.tensor([[v / 10.0 for v in r.values()] for r, _ in rows], dtype=torch.float32)
        y = torch.tensor([int(label) for _, label in rows])
        train.append((x[:samples], y[:samples]))
        test.append((x[samples:], y[samples:]))
    return TaskSequence(train, test, order, n_classes=2, names=[f"SEA{k}" for k in range(4)])
