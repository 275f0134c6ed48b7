"""Routing rules over a pool of LoRA experts, as pure functions of router logits.

Every rule maps logits [T, E] to a `Mix`: dense mixing weights [T, E] (zero where an expert is not used) and the
auxiliary losses it defines, returned explicitly (nothing is collected in module state). Rules:

- `topk` (MixLoRA): softmax, keep the k largest, renormalise; aux: Switch-style load balance.
- `dynmole` (DynMoLE): the Tsallis entropy of the router distribution decides per token: above the threshold
  (an uncertain router) the token is routed softly over every expert; below it, by top-p (the smallest set whose
  probability reaches p, at least `min_k` experts). aux: the mean Tsallis entropy (pushes the router to be sure)
  and the load balance.
- `mixer` (LoRA-Mixer): hard-soft routing: the forward pass uses the hard top-k weights, the backward pass the
  soft probabilities (straight-through), so unchosen experts still learn to be chosen; aux: the specialisation
  balance loss (load balance plus, when each token's domain label is known, the cross-entropy of the router
  towards that domain's expert).
- `soft`: softmax over every expert (the dense baseline). `fixed`: one expert for every token (used to check that
  a mixture forced to one expert equals that adapter alone).

`self_activated_ranks` is MoRA's rule (rank-1 experts gated by their own intermediate activation, within a rank
budget); it acts on activations, not router logits, and lives here because it is routing math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.errors import ConfigError, ShapeError, UnknownNameError

RULES = ("topk", "dynmole", "mixer", "soft", "fixed")


@dataclass(frozen=True)
class Mix:
    weights: Tensor  # [T, E]; zeros where an expert is not used
    aux: dict[str, Tensor] = field(default_factory=dict)  # named scalar losses


@dataclass(frozen=True)
class RuleConfig:
    """Options of a routing rule; each rule reads only its own fields."""

    name: str = "topk"
    k: int = 2  # topk, mixer
    top_p: float = 0.75  # dynmole: probability mass kept below the entropy threshold
    min_k: int = 1  # dynmole: experts kept at least by top-p
    q: float = 1.1  # dynmole: Tsallis entropy index (q -> 1 is Shannon)
    threshold: float = 0.9  # dynmole: entropy above threshold * (entropy of the uniform) routes softly
    expert: int = 0  # fixed

    def check(self, n_experts: int) -> None:
        if self.name not in RULES:
            raise UnknownNameError(f"router {self.name!r} does not exist; expected one of {', '.join(RULES)}")
        if self.name in ("topk", "mixer") and not 1 <= self.k <= n_experts:
            raise ConfigError(f"router {self.name}: k={self.k}; expected 1 <= k <= {n_experts} (the pool size)")
        if self.name == "dynmole":
            if not 0.0 < self.top_p <= 1.0:
                raise ConfigError(f"router dynmole: top_p={self.top_p}; expected 0 < top_p <= 1")
            if not 1 <= self.min_k <= n_experts:
                raise ConfigError(f"router dynmole: min_k={self.min_k}; expected 1 <= min_k <= {n_experts}")
            if not self.q > 0.0:
                raise ConfigError(f"router dynmole: q={self.q}; expected q > 0")
            if not 0.0 <= self.threshold <= 1.0:
                raise ConfigError(f"router dynmole: threshold={self.threshold}; expected 0 <= threshold <= 1")
        if self.name == "fixed" and not 0 <= self.expert < n_experts:
            raise ConfigError(f"router fixed: expert={self.expert}; expected 0 <= expert < {n_experts}")


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ShapeError(f"router logits of shape {tuple(logits.shape)}; expected [tokens, experts]")


def tsallis_entropy(probs: Tensor, q: float) -> Tensor:
    """S_q(p) = (1 - sum_i p_i^q) / (q - 1) per row of probs [T, E]; Shannon entropy at q = 1."""
    if abs(q - 1.0) < 1e-6:
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return (1.0 - probs.pow(q).sum(-1)) / (q - 1.0)


def uniform_tsallis_entropy(n_experts: int, q: float) -> float:
    """The largest Tsallis entropy over n_experts (the uniform distribution's)."""
    return float(tsallis_entropy(torch.full((1, n_experts), 1.0 / n_experts), q)[0])


def topk_mask(probs: Tensor, k: int) -> Tensor:
    """Boolean mask [T, E] of the k largest probabilities per row (ties by lower index)."""
    idx = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)


def top_p_mask(probs: Tensor, p: float, min_k: int = 1) -> Tensor:
    """Boolean mask [T, E]: per row, the most probable experts until their mass reaches p (the expert that crosses
    p is kept), and at least min_k of them."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the experts ranked above each one
    keep_sorted = before < p
    keep_sorted[:, :min_k] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def renormalise(probs: Tensor, mask: Tensor) -> Tensor:
    kept = probs * mask
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)


def load_balance_loss(probs: Tensor, mask: Tensor) -> Tensor:
    """Switch-Transformer balance: E * sum_e f_e * P_e, f_e = share of routed slots that went to expert e, P_e = mean
    router probability of e. Equals 1 when routing is uniform."""
    n_experts = probs.shape[1]
    counts = mask.float().sum(0)
    f = counts / counts.sum().clamp_min(1.0)
    return n_experts * (f * probs.mean(0)).sum()


def specialisation_balance_loss(probs: Tensor, mask: Tensor, labels: Tensor | None = None,
                                weight: float = 1.0) -> Tensor:
    """LoRA-Mixer's specialisation balance loss: the load balance plus, where token labels [T] (the expert each
    token's domain belongs to, -1 for none) are given, weight * the cross-entropy of the router towards them."""
    loss = load_balance_loss(probs, mask)
    if labels is not None:
        known = labels >= 0
        if known.any():
            loss = loss + weight * F.nll_loss(probs[known].clamp_min(1e-12).log(), labels[known])
    return loss


def topk(logits: Tensor, k: int) -> Mix:
    _check_logits(logits)
    probs = logits.float().softmax(-1)
    mask = topk_mask(probs, k)
    return Mix(renormalise(probs, mask), {"balance": load_balance_loss(probs, mask)})


def soft(logits: Tensor) -> Mix:
    _check_logits(logits)
    return Mix(logits.float().softmax(-1))


def fixed(logits: Tensor, expert: int) -> Mix:
    _check_logits(logits)
    weights = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    weights[:, expert] = 1.0
    return Mix(weights)


def dynmole(logits: Tensor, q: float = 1.1, threshold: float = 0.9, top_p: float = 0.75, min_k: int = 1) -> Mix:
    """DynMoLE's hybrid routing (see the module docstring); threshold is relative to the uniform's entropy."""
    _check_logits(logits)
    probs = logits.float().softmax(-1)
    entropy = tsallis_entropy(probs, q)  # [T]
    uncertain = entropy > threshold * uniform_tsallis_entropy(probs.shape[1], q)  # [T]: route softly
    mask = top_p_mask(probs, top_p, min_k) | uncertain.unsqueeze(-1)
    aux = {"tsallis": entropy.mean(), "balance": load_balance_loss(probs, mask)}
    return Mix(renormalise(probs, mask), aux)


def hard_soft(logits: Tensor, k: int, labels: Tensor | None = None) -> Mix:
    """LoRA-Mixer's hard-soft routing: value of the hard top-k weights, gradient of the soft probabilities."""
    _check_logits(logits)
    probs = logits.float().softmax(-1)
    mask = topk_mask(probs, k)
    hard = renormalise(probs, mask).detach()
    weights = hard + probs - probs.detach()
    return Mix(weights, {"sbl": specialisation_balance_loss(probs, mask, labels)})


def route(logits: Tensor, config: RuleConfig, labels: Tensor | None = None) -> Mix:
    """Apply the rule `config.name` to logits [T, E]."""
    config.check(logits.shape[-1])
    if config.name == "topk":
        return topk(logits, config.k)
    if config.name == "dynmole":
        return dynmole(logits, config.q, config.threshold, config.top_p, config.min_k)
    if config.name == "mixer":
        return hard_soft(logits, config.k, labels)
    if config.name == "soft":
        return soft(logits)
    return fixed(logits, config.expert)


def self_activated_ranks(h: Tensor, budget: int) -> Tensor:
    """MoRA's self-activation: a 0/1 gate [T, R] over rank-1 experts from their own intermediate activations
    h [T, R] (h = A x): each token keeps the `budget` ranks with the largest |h| (no router: a rank's activation is
    its relevance). With budget = R every rank is kept and the layer is the plain LoRA."""
    if h.dim() != 2:
        raise ShapeError(f"rank activations of shape {tuple(h.shape)}; expected [tokens, ranks]")
    if not 1 <= budget <= h.shape[1]:
        raise ConfigError(f"rank budget {budget}; expected 1 <= budget <= {h.shape[1]} (the ranks in the pool)")
    return topk_mask(h.detach().abs(), budget).to(h.dtype)
