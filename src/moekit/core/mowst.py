"""Mowst: Mixture of Weak & Strong Experts (on graphs), as the paper defines it, for any pair of classifiers.

A weak expert (an MLP on a sample's own features) predicts p = softmax(u); a strong expert (a GNN, or any larger
model) predicts p' = softmax(u'). The weak expert's confidence comes from the dispersion of its own prediction,

    C(p) = G(D(p)),  D_var(p) = sum_i (p_i - 1/K)^2 / (1 - 1/K)   or   D_ent(p) = 1 - H(p) / log K,

with a monotonically non-decreasing G. `confidence="power"` (the default) is the authors' code's
(facebookresearch/mowst-gnn, `train_test_engine.py`): G(d) = d^alpha, computed without gradient, so C weighs the
losses but is not itself trained; `confidence="learned"` is moekit's differentiable variant
G(d) = sigmoid(softplus(a) d + b), whose gradient dL/dC = CE_weak - CE_strong makes the weak expert confident only
where it beats the strong one. Training minimises
    L = mean_v [ C(p_v) CE(p_v, y_v) + (1 - C(p_v)) CE(p'_v, y_v) ],
alternating between the experts (`MowstClassifier.loss(..., phase)`): in the "weak" phase the strong expert's
prediction is fixed and the weak expert (and a learned G) learn; in the "strong" phase the weak side is fixed and
the strong expert learns on the samples the weak one leaves to it. Inference (`predict`): "sample" uses the weak
prediction with probability C, else the strong one (Mowst, as the authors' code evaluates it); "mix" returns
C p + (1 - C) p'; "threshold" the weak one where C >= 0.5. moekit's `weak_strong` router is a layer-level variant
(confidence from the dispersion of the weak MLP's output vector inside an MoE layer, its own `strong_use` loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, ShapeError

DISPERSIONS = ("variance", "entropy")
CONFIDENCES = ("power", "learned")
PHASES = ("weak", "strong", "joint")
MODES = ("sample", "mix", "threshold")


def dispersion(probs: Tensor, kind: str = "variance") -> Tensor:
    """[N, K] class probabilities -> [N] in [0, 1]: 0 for a uniform prediction, 1 for a one-hot one."""
    k = probs.shape[-1]
    if k < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    if kind == "variance":
        return (probs - 1.0 / k).square().sum(-1) / (1 - 1.0 / k)
    if kind == "entropy":
        return 1 - -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1) / math.log(k)
    raise ConfigError(f"dispersion={kind!r}: expected one of {', '.join(DISPERSIONS)}")


@dataclass
class MowstConfig:
    """dispersion: variance | entropy. confidence: power (G = d^alpha, not differentiated) | learned (G = sigmoid(
    softplus(a) d + b)). alpha: the power. init_scale / init_shift: the learned G's a (before softplus) and b; the
    default b < 0 starts every sample below C = 0.5 (a bias towards the strong expert)."""

    dispersion: str = "variance"
    confidence: str = "power"
    alpha: float = 1.0
    init_scale: float = 2.0
    init_shift: float = -1.0

    def check(self) -> None:
        if self.dispersion not in DISPERSIONS:
            raise ConfigError(f"dispersion={self.dispersion!r}: expected one of {', '.join(DISPERSIONS)}")
        if self.confidence not in CONFIDENCES:
            raise ConfigError(f"confidence={self.confidence!r}: expected one of {', '.join(CONFIDENCES)}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r}: expected a positive number")


@dataclass
class MowstOutput:
    """weak_logits, strong_logits [N, K]; confidence [N]."""

    weak_logits: Tensor
    strong_logits: Tensor
    confidence: Tensor


class MowstClassifier(nn.Module):
    """`weak(weak_input)` and `strong(strong_input)` both return logits [N, K] (`MowstConfig`)."""

    def __init__(self, weak: nn.Module, strong: nn.Module, config: MowstConfig | None = None):
        super().__init__()
        self.config = config or MowstConfig()
        self.config.check()
        self.weak, self.strong = weak, strong
        self.scale = nn.Parameter(torch.tensor(float(self.config.init_scale)))
        self.shift = nn.Parameter(torch.tensor(float(self.config.init_shift)))

    def confidence(self, weak_logits: Tensor) -> Tensor:
        """C = G(D(softmax(weak_logits))) [N]."""
        if self.config.confidence == "power":
            with torch.no_grad():
                d = dispersion(torch.softmax(weak_logits.float(), -1), self.config.dispersion)
                return d.clamp_min(0) ** self.config.alpha
        d = dispersion(torch.softmax(weak_logits.float(), -1), self.config.dispersion)
        return torch.sigmoid(F.softplus(self.scale) * d + self.shift)

    def forward(self, weak_input: Tensor, strong_input: Tensor) -> MowstOutput:
        u, u_strong = self.weak(weak_input), self.strong(strong_input)
        if u.shape != u_strong.shape:
            raise ShapeError(f"weak logits {list(u.shape)} and strong logits {list(u_strong.shape)}: expected the "
                             "same [N, K]")
        return MowstOutput(u, u_strong, self.confidence(u))

    def loss(self, weak_input: Tensor, strong_input: Tensor, labels: Tensor, phase: str = "joint",
             index: Tensor | None = None) -> Tensor:
        """mean_v C CE_weak + (1 - C) CE_strong over the samples `index` (all when None); `phase` fixes the other
        side: 'weak' trains the weak expert and G, 'strong' the strong expert, 'joint' both."""
        if phase not in PHASES:
            raise ConfigError(f"phase={phase!r}: expected one of {', '.join(PHASES)}")
        out = self(weak_input, strong_input)
        u, u_strong, c = out.weak_logits, out.strong_logits, out.confidence
        if index is not None:
            u, u_strong, c, labels = u[index], u_strong[index], c[index], labels[index]
        if phase == "weak":
            u_strong = u_strong.detach()
        elif phase == "strong":
            u, c = u.detach(), c.detach()
        return mowst_loss(u, u_strong, c, labels)

    @torch.no_grad()
    def predict(self, weak_input: Tensor, strong_input: Tensor, mode: str = "sample",
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(class probabilities [N, K], used_strong [N] bool) under `mode` (sample | mix | threshold); under
        'mix' every sample uses both experts."""
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        out = self(weak_input, strong_input)
        p, p_strong, c = torch.softmax(out.weak_logits.float(), -1), torch.softmax(out.strong_logits.float(), -1), \
            out.confidence
        if mode == "mix":
            return c.unsqueeze(-1) * p + (1 - c.unsqueeze(-1)) * p_strong, torch.ones_like(c, dtype=torch.bool)
        threshold = torch.rand(c.shape, generator=generator, device=c.device) if mode == "sample" else 0.5
        use_weak = c > threshold if mode == "sample" else c >= threshold
        return torch.where(use_weak.unsqueeze(-1), p, p_strong), ~use_weak


def mowst_loss(weak_logits: Tensor, strong_logits: Tensor, confidence: Tensor, labels: Tensor) -> Tensor:
    """mean_v [C_v CE(weak_v, y_v) + (1 - C_v) CE(strong_v, y_v)]."""
    ce_weak = F.cross_entropy(weak_logits.float(), labels, reduction="none")
    ce_strong = F.cross_entropy(strong_logits.float(), labels, reduction="none")
    return (confidence * ce_weak + (1 - confidence) * ce_strong).mean()
