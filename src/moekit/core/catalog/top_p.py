"""Top-p dynamic routing (Harder Tasks Need More Experts: Dynamic Routing in MoE Models).

p = softmax(x W^T); sort p descending; keep the smallest prefix S with sum_{i in S} p_i >= threshold (at least one
expert); y = sum_{i in S} p_i E_i(x) (the kept probabilities are not renormalised). Confident tokens use one
expert, uncertain ones several. The paper's dynamic loss, the router entropy L_d = mean_t -sum_i p_i log p_i, keeps
the router from spreading its mass to activate many experts; the usual balance loss stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, check_k, widen
from moekit.errors import ConfigError


@dataclass
class TopPOptions(RouterOptions):
    """p: the probability mass to reach (0 < p <= 1). max_k: at most this many experts per token (None: any
    number; a per-call `k` overrides it). entropy_weight: weight of the router-entropy loss in `aux_loss`."""

    p: float = 0.4
    max_k: int | None = None
    entropy_weight: float = 1e-4


def top_p_routing(logits: Tensor, p: float, max_k: int | None = None) -> Routing:
    """logits [T, E] -> Routing padded to the most experts any token keeps (mask marks the padding)."""
    probs = torch.softmax(widen(logits), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep = mass_before < p  # slot j is needed while the better experts hold less than p; slot 0 always
    if max_k is not None:
        keep[:, max_k:] = False
    width = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
    keep, order, sorted_p = keep[:, :width], order[:, :width], sorted_p[:, :width]
    return Routing(logits, sorted_p * keep, order, mask=keep, probs=probs)


def router_entropy(probs: Tensor) -> Tensor:
    """mean_t -sum_i p_{t,i} log p_{t,i}."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()


@register_router("top_p")
class TopPRouter(Router):
    """Experts per token vary: the fewest whose probability mass reaches `p` (`TopPOptions`)."""

    Options = TopPOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if not 0 < self.options.p <= 1:
            raise ConfigError(f"router_options.p={self.options.p}: expected a value in (0, 1]")
        if self.options.max_k is not None:
            check_k(self.options.max_k, num_experts, "router_options.max_k")

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        self.check_input(hidden, k)
        return top_p_routing(self.checked_logits(hidden), self.options.p, self.options.max_k if k is None else k)

    def extra_losses(self, routing: Routing) -> dict[str, tuple[Tensor, float]]:
        return {"entropy": (router_entropy(routing.probs), self.options.entropy_weight)}
