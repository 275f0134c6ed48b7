"""Expert-choice routing (Zhou et al., Mixture-of-Experts with Expert Choice Routing).

S = softmax(x W^T) [T, E]; every expert e takes the c tokens with the largest S[:, e], c = ceil(factor * T * k / E)
(at most T), and y_t = sum_{e : t in top-c(e)} S[t, e] E_e(x_t). Load is perfectly even by construction (every
expert processes exactly c tokens), so there is no balance loss; a token may get zero or many experts. The choice
looks at every token of the batch at once, so it is not causal (a token's experts depend on later tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.catalog._util import pack_chosen
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, widen
from moekit.errors import ConfigError


@dataclass
class ExpertChoiceOptions(RouterOptions):
    """capacity_factor: each expert takes ceil(capacity_factor * T * k / E) tokens (1.0: k experts per token on
    average, as token-choice top-k)."""

    capacity_factor: float = 1.0


def expert_choice_routing(logits: Tensor, k: int, capacity_factor: float) -> Routing:
    """logits [T, E] -> Routing padded to the most experts any token got (mask marks the padding)."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(widen(logits), dim=-1)
    capacity = min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts))
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    if capacity:
        tokens = torch.topk(probs.t(), capacity, dim=-1).indices  # [E, c]
        chosen[tokens, torch.arange(num_experts, device=logits.device).unsqueeze(-1)] = True
    indices, weights, mask = pack_chosen(chosen, probs)
    return Routing(logits, weights, indices, mask=mask, probs=probs)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert picks its top-c tokens (`ExpertChoiceOptions`)."""

    Options = ExpertChoiceOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if not self.options.capacity_factor > 0:
            raise ConfigError(f"router_options.capacity_factor={self.options.capacity_factor}: expected a positive "
                              "number")

    def rule(self, logits: Tensor, k: int) -> Routing:
        return expert_choice_routing(logits, k, self.options.capacity_factor)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None
