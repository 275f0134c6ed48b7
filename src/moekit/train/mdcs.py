"""MDCS: More Diverse experts with Consistency Self-distillation, for long-tailed recognition.

E experts see the same input (a shared backbone or separate networks) and give logits z_i [N, K]; pi is the
training set's class prior. Two losses:

- Diversity loss (DL): expert i learns with a logit adjustment of its own strength lambda_i,
      L_DL = 1/E sum_i CE(softmax((z_i + lambda_i log pi) / tau), y),   lambda_i = lambda_max * i / (E - 1),
  so expert 0 (lambda 0) fits the long-tailed data as it is (head-leaning), lambda = 1 is the balanced-softmax
  expert and larger lambdas lean to the tail: the experts focus on different parts of the label distribution.
- Consistency self-distillation (CS): each sample comes as a weakly and a strongly augmented view; for every
  expert, the weak view's prediction (detached, temperature T) teaches the strong view's,
      L_CS = 1/E sum_i T^2 mean_{n in CIS} KL(softmax(z_i^weak / T) || softmax(z_i^strong / T)),
  over Confident Instance Sampling: only the samples the experts' ensemble classifies correctly on the weak view.

Total: L = L_DL(strong view) + cs_weight L_CS. Prediction: the mean of the experts' logits (the ensemble).
The digits augmentations (`augment`): weak = Gaussian noise of std 0.05; strong = a random shift of the 8x8
image by up to one pixel, 20% of the pixels zeroed, noise of std 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.errors import ConfigError


@dataclass
class MDCSConfig:
    """lambda_max: the last expert's logit-adjustment strength; tau: DL temperature; temperature: CS's T;
    cs_weight: weight of L_CS (non-negative)."""

    lambda_max: float = 2.0
    tau: float = 1.0
    temperature: float = 2.0
    cs_weight: float = 1.0

    def check(self) -> None:
        for name in ("tau", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a positive number")
        if not self.cs_weight >= 0:
            raise ConfigError(f"cs_weight={self.cs_weight!r}: expected a non-negative number")
        if not self.lambda_max >= 0:
            raise ConfigError(f"lambda_max={self.lambda_max!r}: expected a non-negative number")


def expert_lambdas(num_experts: int, lambda_max: float) -> list[float]:
    if num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r}: expected a positive integer")
    if num_experts == 1:
        return [1.0]
    return [lambda_max * i / (num_experts - 1) for i in range(num_experts)]


def class_prior(labels: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    if (counts == 0).any():
        raise ConfigError(f"labels: class {int(torch.nonzero(counts == 0)[0])} has no sample; expected every class")
    return counts / counts.sum()


def diversity_loss(logits: list[Tensor], labels: Tensor, prior: Tensor, config: MDCSConfig) -> Tensor:
    """1/E sum_i CE((z_i + lambda_i log pi) / tau, y)."""
    log_prior = prior.log().to(logits[0].dtype)
    lambdas = expert_lambdas(len(logits), config.lambda_max)
    return sum(F.cross_entropy((z + lam * log_prior) / config.tau, labels)
               for z, lam in zip(logits, lambdas, strict=True)) / len(logits)


def confident(weak_logits: list[Tensor], labels: Tensor) -> Tensor:
    """[N] bool: the ensemble (mean logits) of the weak view classifies the sample correctly."""
    return torch.stack(weak_logits).mean(0).argmax(-1) == labels


def consistency_loss(weak_logits: list[Tensor], strong_logits: list[Tensor], labels: Tensor,
                     temperature: float) -> Tensor:
    """1/E sum_i T^2 mean over the confident samples of KL(p_weak || p_strong) (0 if none is confident)."""
    keep = confident([w.detach() for w in weak_logits], labels)
    if not keep.any():
        return strong_logits[0].new_zeros(())
    t = temperature
    total = strong_logits[0].new_zeros(())
    for w, s in zip(weak_logits, strong_logits, strict=True):
        teacher = F.log_softmax(w.detach()[keep] / t, -1)
        student = F.log_softmax(s[keep] / t, -1)
        total = total + t * t * (teacher.exp() * (teacher - student)).sum(-1).mean()
    return total / len(weak_logits)


def mdcs_loss(weak_logits: list[Tensor], strong_logits: list[Tensor], labels: Tensor, prior: Tensor,
              config: MDCSConfig) -> tuple[Tensor, dict[str, Tensor]]:
    config.check()
    dl = diversity_loss(strong_logits, labels, prior, config)
    cs = consistency_loss(weak_logits, strong_logits, labels, config.temperature)
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
