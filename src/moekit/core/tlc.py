"""Trustworthy Long-Tailed Classification (TLC): evidential experts combined by Dempster-Shafer theory, with as
many experts per sample as its uncertainty asks for.

Expert m maps a sample to non-negative evidence e^m = softplus(z^m) [K]; its Dirichlet is alpha^m = e^m + 1 with
strength S^m = sum_k alpha^m_k, beliefs b^m_k = e^m_k / S^m and uncertainty u^m = K / S^m (sum_k b^m_k + u^m = 1).
Two opinions combine by Dempster's rule (`combine`): with conflict C = sum_{i != j} b^1_i b^2_j,

    b_k = (b^1_k b^2_k + b^1_k u^2 + b^2_k u^1) / (1 - C),      u = u^1 u^2 / (1 - C).

Dynamic engagement (`TLCClassifier.predict`): experts join one at a time in a fixed order and a sample stops as
soon as its combined uncertainty falls below `threshold`, so easy samples use one expert and hard ones (tail
classes, unfamiliar inputs) more. Training (`TLCClassifier.loss`) puts the evidential loss on every expert and on
their combination: the expected cross-entropy under the Dirichlet, sum_k y_k (digamma(S) - digamma(alpha_k)), plus
an annealed KL(Dir(alpha~) || Dir(1)) on the evidence left for wrong classes (alpha~ = y + (1 - y) alpha), weight
min(1, step / anneal_steps). The evidence of a combined opinion is read back as e = b S with S = K / u.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError


@dataclass
class Opinion:
    """belief [N, K] and uncertainty [N]: sum_k belief + uncertainty = 1."""

    belief: Tensor
    uncertainty: Tensor

    @property
    def num_classes(self) -> int:
        return self.belief.shape[-1]

    def alpha(self) -> Tensor:
        """The Dirichlet parameters: S = K / u, alpha = b S + 1."""
        strength = self.num_classes / self.uncertainty.clamp_min(1e-12)
        return self.belief * strength.unsqueeze(-1) + 1


def opinion(logits: Tensor) -> Opinion:
    """An expert's subjective opinion from its logits [N, K] (evidence = softplus)."""
    evidence = F.softplus(logits.float() if logits.dtype != torch.float64 else logits)
    strength = evidence.sum(-1) + logits.shape[-1]
    return Opinion(evidence / strength.unsqueeze(-1), logits.shape[-1] / strength)


def combine(a: Opinion, b: Opinion) -> Opinion:
    """Dempster's rule for two opinions (module docstring)."""
    agree = a.belief * b.belief
    conflict = a.belief.sum(-1) * b.belief.sum(-1) - agree.sum(-1)
    scale = 1.0 / (1 - conflict).clamp_min(1e-12)
    belief = (agree + a.belief * b.uncertainty.unsqueeze(-1) + b.belief * a.uncertainty.unsqueeze(-1))
    return Opinion(belief * scale.unsqueeze(-1), a.uncertainty * b.uncertainty * scale)


def evidential_loss(alpha: Tensor, labels: Tensor, kl_weight: float) -> Tensor:
    """mean_n [sum_k y_k (digamma(S) - digamma(alpha_k)) + kl_weight KL(Dir(alpha~) || Dir(1))]."""
    k = alpha.shape[-1]
    y = F.one_hot(labels, k).to(alpha.dtype)
    strength = alpha.sum(-1, keepdim=True)
    ce = (y * (torch.digamma(strength) - torch.digamma(alpha))).sum(-1)
    tilde = y + (1 - y) * alpha
    s_tilde = tilde.sum(-1)
    kl = (torch.lgamma(s_tilde) - torch.lgamma(torch.tensor(float(k), dtype=alpha.dtype)) - torch.lgamma(tilde).sum(-1)
          + ((tilde - 1) * (torch.digamma(tilde) - torch.digamma(s_tilde).unsqueeze(-1))).sum(-1))
    return (ce + kl_weight * kl).mean()


@dataclass
class TLCConfig:
    """threshold: a sample stops engaging experts once its combined uncertainty is below it. anneal_steps: the
    KL term's weight grows as min(1, step / anneal_steps)."""

    threshold: float = 0.2
    anneal_steps: int = 100

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold={self.threshold!r}: expected a number in (0, 1]")
        if not isinstance(self.anneal_steps, int) or self.anneal_steps < 1:
            raise ConfigError(f"anneal_steps={self.anneal_steps!r}: expected a positive integer")


class TLCClassifier(nn.Module):
    """Evidential experts (each `nn.Module`: x -> logits [N, K]) combined by Dempster's rule (`TLCConfig`)."""

    def __init__(self, experts: list[nn.Module], config: TLCConfig | None = None):
        super().__init__()
        if not experts:
            raise ConfigError("experts: expected at least one expert")
        self.config = config or TLCConfig()
        self.config.check()
        self.experts = nn.ModuleList(experts)

    def opinions(self, x: Tensor) -> list[Opinion]:
        return [opinion(e(x)) for e in self.experts]

    def loss(self, x: Tensor, labels: Tensor, step: int) -> Tensor:
        """Evidential loss on every expert and on the combination of all of them."""
        kl_weight = min(1.0, step / self.config.anneal_steps)
        ops = self.opinions(x)
        fused = ops[0]
        for o in ops[1:]:
            fused = combine(fused, o)
        return sum(evidential_loss(o.alpha(), labels, kl_weight) for o in [*ops, fused]) / (len(ops) + 1)

    @torch.no_grad()
    def predict(self, x: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(predicted class [N], experts engaged [N], final uncertainty [N]). Experts are evaluated only for the
        samples still engaged."""
        t = self.config.threshold if threshold is None else threshold
        if not 0 < t <= 1:
            raise ConfigError(f"threshold={t!r}: expected a number in (0, 1]")
        n = x.shape[0]
        fused = opinion(self.experts[0](x))
        engaged = torch.ones(n, dtype=torch.long, device=x.device)
        for expert in self.experts[1:]:
            active = torch.nonzero(fused.uncertainty >= t).flatten()
            if active.numel() == 0:
                break
            more = combine(Opinion(fused.belief[active], fused.uncertainty[active]), opinion(expert(x[active])))
            fused.belief[active], fused.uncertainty[active] = more.belief, more.uncertainty
            engaged[active] += 1
        return fused.belief.argmax(-1), engaged, fused.uncertainty
