"""Null experts (AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language Models).

The router scores E real and n null experts: p = softmax(x W^T) over E + n; each token takes the top-k of all
E + n (k raised above the usual), and null experts compute nothing, so a token uses between 0 and k real experts:
y = sum_{i in topk, i < E} (p_i / sum_{j in topk, j < E} p_j) E_i(x). The balance loss treats the identical null
experts as one bucket: L = (E + n) (sum_{i < E} f_i P_i + (sum_null f)(sum_null P) / n), whose minimum under
uniform routing is k, as for the Switch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.catalog._util import resize_weight
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, widen
from moekit.errors import ConfigError


@dataclass
class NullExpertsOptions(RouterOptions):
    """num_null: zero-compute experts added to the router (None: as many as real experts)."""

    num_null: int | None = None


def null_expert_routing(logits: Tensor, k: int, num_real: int) -> Routing:
    """logits [T, E + n] -> Routing over the E real experts; null choices are padded slots."""
    probs = torch.softmax(widen(logits), dim=-1)
    top_p, top_i = torch.topk(probs, k, dim=-1)
    real = top_i < num_real
    kept = top_p * real
    weights = kept / kept.sum(-1, keepdim=True).clamp_min(1e-20)
    indices = torch.where(real, top_i, torch.zeros_like(top_i))
    return Routing(logits[:, :num_real], weights, indices, mask=real, probs=probs[:, :num_real],
                   aux={"all_probs": probs, "all_indices": top_i})


def null_bucket_balance_loss(all_probs: Tensor, all_indices: Tensor, num_real: int) -> Tensor:
    """AdaMoE's balance loss from the probabilities [T, E + n] and choices [T, k] over all experts."""
    num_tokens, total = all_probs.shape
    if num_tokens == 0:
        return all_probs.new_zeros(())
    f = torch.bincount(all_indices.reshape(-1), minlength=total).to(all_probs.dtype) / num_tokens
    p = all_probs.mean(0)
    num_null = total - num_real
    real = (f[:num_real] * p[:num_real]).sum()
    return total * (real + f[num_real:].sum() * p[num_real:].sum() / num_null)


@register_router("null_experts")
class NullExpertsRouter(Router):
    """Top-k over E real + n null experts; weights renormalised over the real ones (`NullExpertsOptions`)."""

    Options = NullExpertsOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        self.num_null = num_experts if self.options.num_null is None else self.options.num_null
        if not isinstance(self.num_null, int) or self.num_null < 1:
            raise ConfigError(f"router_options.num_null={self.options.num_null!r}: expected a positive integer")
        resize_weight(self, num_experts + self.num_null, hidden_size)

    def rule(self, logits: Tensor, k: int) -> Routing:
        return null_expert_routing(logits, k, self.num_experts)

    def balance_loss(self, routing: Routing) -> Tensor:
        return null_bucket_balance_loss(routing.aux["all_probs"], routing.aux["all_indices"], self.num_experts)
