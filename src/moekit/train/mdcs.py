"""MDCS: More Diverse experts with Consistency Self-distillation, for long-tailed recognition.

E experts see the same input (a shared backbone or separate networks) and give logits z_i [N, K]; pi is the
training set's class prior. Expert i's adjusted logits are z~_i = z_i + lambda_i log pi, with lambda_i evenly spaced
from lambda_min to lambda_max (the authors' code, fistyee/MDCS `model/loss.py`, uses -0.5, 1 and 2.5 for three
experts: the defaults here). Two losses:

- Diversity loss (DL): L_DL = sum_i CE(softmax(z~_i / tau), y) on both views, so the lambda = -0.5 expert leans to
  the head classes, lambda = 1 is the balanced-softmax expert and lambda = 2.5 leans to the tail: the experts focus
  on different parts of the label distribution.
- Consistency self-distillation (CS): each sample comes as a weakly and a strongly augmented view; for every expert,
  its weak view's adjusted prediction (detached, temperature T) teaches its strong view's,
      L_CS = sum_i T^2 mean_{n in CIS_i} KL(softmax(z~_i^weak / T) || softmax(z~_i^strong / T)),
  over Confident Instance Sampling: only the samples expert i classifies correctly on the weak view.

Total: L = L_DL + cs_weight L_CS (the authors' code: weight 0.6, ramped up over the first epochs, T = 1; its loss
sums over experts where moekit averages, which only rescales the learning rate). Prediction: the mean of the
experts' raw logits z_i (the ensemble). The digits augmentations (`augment`): weak = Gaussian noise of std 0.05;
strong = a random shift of the 8x8 image by up to one pixel, 20% of the pixels zeroed, noise of std 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.errors import ConfigError


@dataclass
class MDCSConfig:
    """lambda_min / lambda_max: the first and last experts' logit-adjustment strengths; tau: DL temperature;
    temperature: CS's T; cs_weight: weight of L_CS (non-negative)."""

    lambda_min: float = -0.5
    lambda_max: float = 2.5
    tau: float = 1.0
    temperature: float = 1.0
    cs_weight: float = 0.6

    def check(self) -> None:
        for name in ("tau", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a positive number")
        if not self.cs_weight >= 0:
            raise ConfigError(f"cs_weight={self.cs_weight!r}: expected a non-negative number")
        if not self.lambda_min <= self.lambda_max:
            raise ConfigError(f"lambda_min={self.lambda_min!r}: expected at most lambda_max={self.lambda_max!r}")


def expert_lambdas(num_experts: int, lambda_min: float, lambda_max: float) -> list[float]:
    if num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r}: expected a positive integer")
    if num_experts == 1:
        return [1.0]
    return [lambda_min + (lambda_max - lambda_min) * i / (num_experts - 1) for i in range(num_experts)]


def adjusted(logits: list[Tensor], prior: Tensor, config: MDCSConfig) -> list[Tensor]:
    """z_i + lambda_i log pi for every expert."""
    log_prior = prior.log().to(logits[0].dtype)
    lambdas = expert_lambdas(len(logits), config.lambda_min, config.lambda_max)
    return [z + lam * log_prior for z, lam in zip(logits, lambdas, strict=True)]


def class_prior(labels: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    if (counts == 0).any():
        raise ConfigError(f"labels: class {int(torch.nonzero(counts == 0)[0])} has no sample; expected every class")
    return counts / counts.sum()


def diversity_loss(logits: list[Tensor], labels: Tensor, prior: Tensor, config: MDCSConfig) -> Tensor:
    """1/E sum_i CE((z_i + lambda_i log pi) / tau, y)."""
    return sum(F.cross_entropy(z / config.tau, labels) for z in adjusted(logits, prior, config)) / len(logits)


def consistency_loss(weak_adjusted: list[Tensor], strong_adjusted: list[Tensor], labels: Tensor,
                     temperature: float) -> Tensor:
    """1/E sum_i T^2 mean over expert i's confident samples (its weak view right) of KL(p_weak || p_strong), on
    adjusted logits; an expert with no confident sample adds 0."""
    t = temperature
    total = strong_adjusted[0].new_zeros(())
    for w, s in zip(weak_adjusted, strong_adjusted, strict=True):
        keep = w.detach().argmax(-1) == labels
        if not keep.any():
            continue
        teacher = F.log_softmax(w.detach()[keep] / t, -1)
        student = F.log_softmax(s[keep] / t, -1)
        total = total + t * t * (teacher.exp() * (teacher - student)).sum(-1).mean()
    return total / len(weak_adjusted)


def mdcs_loss(weak_logits: list[Tensor], strong_logits: list[Tensor], labels: Tensor, prior: Tensor,
              config: MDCSConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """L_DL on both views (their mean) + cs_weight L_CS."""
    config.check()
    dl = (diversity_loss(weak_logits, labels, prior, config) + diversity_loss(strong_logits, labels, prior, config)) / 2
    cs = consistency_loss(adjusted(weak_logits, prior, config), adjusted(strong_logits, prior, config), labels,
                          config.temperature)
    return dl + config.cs_weight * cs, {"diversity": dl, "consistency": cs}


def augment(x: Tensor, strong: bool, generator: torch.Generator | None = None) -> Tensor:
    """Digits views [N, 64] (module docstring)."""
    if not strong:
        return x + 0.05 * torch.randn(x.shape, generator=generator)
    n = x.shape[0]
    img = x.view(n, 8, 8)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2)).reshape(n, 64)
    keep = torch.rand(img.shape, generator=generator) >= 0.2
    return img * keep + 0.15 * torch.randn(img.shape, generator=generator)
