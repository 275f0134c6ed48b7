"""Domain experts: a global/local expert with a gate, and Meta-DMoE's test-time distillation, on shifted digits.

**Global/local** (A Mixture of Expert Approach for Low-Cost Customization of DNNs): a trained global expert (GE)
is kept frozen; a small local expert (LE) learns a user's few samples; a gating network (GN) learns to tell the
user's inputs (1) from a small sample of generic inputs (0) and sends each input to LE when GN(x) > 0.5, else GE.

**Meta-DMoE** (Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from MoE), simplified: one teacher per
source domain; an aggregator (one self-attention layer over the teachers' logits, then a linear read-out) trained
on the source domains leave-one-out (a batch of domain k is aggregated without teacher k, so the aggregator
learns to combine teachers for a domain none of them saw); a student trained on all sources. At test time the
student is distilled (KL to the aggregator's softened output) on a few unlabeled target samples. Not done: the
paper's meta-learning of the student's initialisation (MAML-style bi-level training) and its transformer over
teacher features (here over logits).

Domains: scikit-learn's bundled 8x8 digits shifted by (dx, dy) pixels with zero fill, times a contrast factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.adapt.continual import mlp
from moekit.errors import ConfigError


def shifted_digits(dx: int = 0, dy: int = 0, contrast: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor,
                                                                                              Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) of the digits shifted by dx (right) and dy (down) pixels, zero fill."""
    from sklearn.datasets import load_digits

    if abs(dx) > 7 or abs(dy) > 7:
        raise ConfigError(f"dx={dx}, dy={dy}: expected shifts within the 8x8 image")
    data = load_digits()
    img = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 8, 8)
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    if dy > 0:
        img[:, :dy] = 0
    elif dy < 0:
        img[:, dy:] = 0
    if dx > 0:
        img[:, :, :dx] = 0
    elif dx < 0:
        img[:, :, dx:] = 0
    x, y = (img * contrast).reshape(-1, 64), torch.tensor(data.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def fit(net: nn.Module, x: Tensor, y: Tensor, epochs: int = 30, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@torch.no_grad()
def accuracy(predict, x: Tensor, y: Tensor) -> float:
    return float((predict(x) == y).float().mean())


class GlobalLocal:
    """GE frozen; `fit_local(x_user, y_user, x_generic)` trains LE and GN; `predict(x)` routes by GN."""

    def __init__(self, global_expert: nn.Module, d_in: int = 64, n_classes: int = 10, hidden: int = 16):
        self.ge = global_expert.requires_grad_(False)
        self.le = mlp(d_in, hidden, n_classes)
        self.gn = nn.Linear(d_in, 2)

    def fit_local(self, x_user: Tensor, y_user: Tensor, x_generic: Tensor, epochs: int = 200, seed: int = 0) -> None:
        if len(x_user) == 0 or len(x_generic) == 0:
            raise ConfigError("x_user, x_generic: expected some samples of each to train the local expert and gate")
        fit(self.le, x_user, y_user, epochs, seed=seed)
        xs = torch.cat([x_user, x_generic])
        src = torch.cat([torch.ones(len(x_user), dtype=torch.long), torch.zeros(len(x_generic), dtype=torch.long)])
        fit(self.gn, xs, src, epochs, seed=seed)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        local = self.gn(x).argmax(-1) == 1
        return torch.where(local, self.le(x).argmax(-1), self.ge(x).argmax(-1))

    def overhead(self) -> float:
        """Parameters of LE + GN over GE's."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        return (count(self.le) + count(self.gn)) / count(self.ge)


class Aggregator(nn.Module):
    """Self-attention over K teachers' logits (tokens [B, K, C]), mean-pooled, read out as class logits. A
    `drop` teacher is masked out of the attention and the pool."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(n_classes, width)
        self.attn = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.out = nn.Linear(width, n_classes)

    def forward(self, logits: Tensor, drop: int | None = None) -> Tensor:  # logits [B, K, C]
        keep = torch.ones(logits.shape[1], dtype=torch.bool)
        if drop is not None:
            keep[drop] = False
        h = self.inp(logits)
        h = h + self.attn(h, h, h, key_padding_mask=~keep.expand(len(h), -1))[0]
        return self.out(h[:, keep].mean(1))


@dataclass
class MetaDMoE:
    teachers: list[nn.Module]
    aggregator: Aggregator
    student: nn.Module

    def teacher_logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.stack([t(x) for t in self.teachers], dim=1)  # [B, K, C]

    def adapt(self, x_target: Tensor, steps: int = 20, lr: float = 1e-3, temperature: float = 2.0) -> nn.Module:
        """Distil the student on unlabeled target samples toward the aggregated teachers; returns the adapted copy
        (the stored student is not changed)."""
        if len(x_target) == 0 or steps < 1:
            raise ConfigError(f"x_target ({len(x_target)} samples), steps={steps}: expected samples and steps >= 1")
        import copy

        student = copy.deepcopy(self.student)
        with torch.no_grad():
            target = F.softmax(self.aggregator(self.teacher_logits(x_target)) / temperature, -1)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.kl_div(F.log_softmax(student(x_target) / temperature, -1), target, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        return student


def train_meta_dmoe(domains: list[tuple[Tensor, Tensor]], hidden: int = 64, epochs: int = 20,
                    agg_epochs: int = 10, seed: int = 0) -> MetaDMoE:
    """Teachers per source domain, the aggregator leave-one-domain-out, the student on all sources."""
    if len(domains) < 2:
        raise ConfigError(f"domains: expected at least 2 source domains for leave-one-out, got {len(domains)}")
    torch.manual_seed(seed)
    teachers = [fit(mlp(64, hidden, 10), x, y, epochs, seed=seed).requires_grad_(False) for x, y in domains]
    agg = Aggregator(10)
    model = MetaDMoE(teachers, agg, mlp(64, hidden, 10))
    opt = torch.optim.Adam(agg.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(agg_epochs):
        for k, (x, y) in enumerate(domains):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                loss = F.cross_entropy(agg(model.teacher_logits(x[idx]), drop=k), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    fit(model.student, torch.cat([x for x, _ in domains]), torch.cat([y for _, y in domains]), epochs, seed=seed)
    return model
