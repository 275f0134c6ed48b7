"""The `Routing` record and the routing rules as pure functions of router logits.

Every rule takes logits `[T, E]` and returns a `Routing`. Routers (`routers.py`) own the parameters that
produce the logits and pick a rule; the math lives here so it can be tested on hand-built logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.errors import ConfigError


@dataclass
class Routing:
    """Which experts each token goes to and with what weight.

    logits:  [T, E] raw router logits.
    weights: [T, k] combine weight of each slot (0 on padded slots).
    indices: [T, k] expert id of each slot (int64; any valid id on padded slots).
    mask:    [T, k] bool, False on padded slots; None means every slot is real. Routers that give a token a
             variable number of experts (top-p, null experts) pad to a common k and mark the padding here.
    probs:   [T, E] the per-expert scores the balance losses average (softmax, or normalised sigmoid).
    aux:     tensors a research router keeps for its own losses (e.g. the logits of null experts).
    """

    logits: Tensor
    weights: Tensor
    indices: Tensor
    mask: Tensor | None = None
    probs: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    def slot_mask(self) -> Tensor:
        """[T, k] bool: True where a slot is real."""
        if self.mask is None:
            return torch.ones_like(self.indices, dtype=torch.bool)
        return self.mask

    def experts_per_token(self) -> Tensor:
        """[T] number of real experts each token is sent to."""
        return self.slot_mask().sum(dim=-1)

    def counts(self) -> Tensor:
        """[E] int64: assignments per expert, padded slots excluded."""
        idx = self.indices if self.mask is None else self.indices[self.mask]
        return torch.bincount(idx.reshape(-1), minlength=self.num_experts)


def widen(t: Tensor) -> Tensor:
    """Routing math runs in float32 at least (float64 stays float64, for gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


def check_k(k: int, num_experts: int, what: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ConfigError(f"{what}={k!r}: expected an integer from 1 to num_experts={num_experts}")


def softmax_topk(logits: Tensor, k: int, normalize: bool = True) -> Routing:
    """p = softmax(logits); keep the k largest p; with `normalize`, w = p_topk / sum(p_topk) (Mixtral, Qwen)."""
    check_k(k, logits.shape[-1])
    probs = torch.softmax(widen(logits), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, weights, indices, probs=probs)


def topk_softmax(logits: Tensor, k: int) -> Routing:
    """Keep the k largest logits, then w = softmax over those k only (GPT-OSS)."""
    check_k(k, logits.shape[-1])
    top, indices = torch.topk(widen(logits), k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return Routing(logits, weights, indices, probs=torch.softmax(widen(logits), dim=-1))


def _group_mask(scores: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """[T, E] bool: True for experts whose group is among the `topk_group` best groups of each token.

    A group's score is its best expert ("max", DeepSeek-V2) or the sum of its two best ("top2", DeepSeek-V3).
    """
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, n_group, num_experts // n_group)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)


def check_groups(num_experts: int, n_group: int, topk_group: int, k: int) -> None:
    if n_group < 1 or num_experts % n_group:
        raise ConfigError(f"n_group={n_group}: expected a divisor of num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ConfigError(f"topk_group={topk_group}: expected an integer from 1 to n_group={n_group}")
    if k > topk_group * (num_experts // n_group):
        raise ConfigError(
            f"k={k}: expected at most topk_group * experts per group = {topk_group * (num_experts // n_group)}"
        )


def sigmoid_group_topk(
    logits: Tensor,
    k: int,
    correction_bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> Routing:
    """DeepSeek-V3: s = sigmoid(logits); select with s + b (b only steers selection, never weights).

    Groups are ranked by the sum of their two best biased scores; only the `topk_group` best groups compete.
    w = s_topk (/ sum s_topk if `normalize`) * `scaling` (routed_scaling_factor).
    """
    num_experts = logits.shape[-1]
    check_k(k, num_experts)
    check_groups(num_experts, n_group, topk_group, k)
    scores = torch.sigmoid(widen(logits))
    choice = scores if correction_bias is None else scores + widen(correction_bias)
    if n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, n_group, topk_group, "top2"), float("-inf"))
    indices = torch.topk(choice, k, dim=-1).indices
    weights = scores.gather(1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(logits, weights, indices, probs=probs)


def softmax_group_topk(
    logits: Tensor,
    k: int,
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = False,
    scaling: float = 1.0,
) -> Routing:
    """DeepSeek-V2: p = softmax(logits); `greedy` takes the top-k of p; `group_limited_greedy` first keeps the
    `topk_group` groups with the largest single p, then the top-k inside them. w = p_topk * `scaling`.
    """
    num_experts = logits.shape[-1]
    check_k(k, num_experts)
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"method={method!r}: expected 'greedy' or 'group_limited_greedy'")
    probs = torch.softmax(widen(logits), dim=-1)
    choice = probs
    if method == "group_limited_greedy":
        check_groups(num_experts, n_group, topk_group, k)
        choice = probs.masked_fill(~_group_mask(probs, n_group, topk_group, "max"), 0.0)
    weights, indices = torch.topk(choice, k, dim=-1)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    return Routing(logits, weights, indices, probs=probs)
