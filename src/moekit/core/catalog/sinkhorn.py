"""Balanced assignment by entropic optimal transport, with a hard cap on each expert's tokens.

A stand-in for Sparsity-Constrained Optimal Transport (Liu et al.) in the S-BASE form (Clark et al.): the plan
pi = Sinkhorn(exp(logits / tau)) has row sums k (each token sends k units) and column sums T k / E (every expert
gets an equal share); each token takes the top-k experts of its row of pi, and each expert keeps at most
c = ceil(capacity_factor * T * k / E) of the tokens that chose it (the best by pi), so no expert exceeds c, the
cardinality constraint of the paper. Weights are the router's softmax over the k chosen, renormalised; an
assignment over the cap keeps weight 0 (a padded slot). Selection is not differentiated (the gradient reaches the
router through the weights), and the loads are balanced by construction: no balance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, widen
from moekit.errors import ConfigError


@dataclass
class SinkhornOptions(RouterOptions):
    """iterations: Sinkhorn row/column normalisations. temperature: tau. capacity_factor: the per-expert cap."""

    iterations: int = 8
    temperature: float = 1.0
    capacity_factor: float = 1.0


@torch.no_grad()
def sinkhorn_plan(logits: Tensor, k: int, iterations: int, temperature: float) -> Tensor:
    """log pi [T, E]: rows sum to k, columns to T k / E (the last normalisation is the rows')."""
    num_tokens, num_experts = logits.shape
    log_pi = widen(logits) / temperature
    for _ in range(iterations):
        log_pi = log_pi - torch.logsumexp(log_pi, dim=0, keepdim=True) + math.log(num_tokens * k / num_experts)
        log_pi = log_pi - torch.logsumexp(log_pi, dim=1, keepdim=True) + math.log(k)
    return log_pi


def cap_per_expert(indices: Tensor, score: Tensor, capacity: int) -> Tensor:
    """[T, k] bool: each expert keeps at most `capacity` of its assignments, those with the highest `score`
    (ties: earlier token, earlier slot)."""
    flat_e, flat_s = indices.reshape(-1), score.reshape(-1)
    by_score = torch.argsort(-flat_s, stable=True)
    order = by_score[torch.argsort(flat_e[by_score], stable=True)]  # by expert, best score first
    counts = torch.bincount(flat_e, minlength=int(flat_e.max()) + 1 if flat_e.numel() else 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_e)
    rank[order] = torch.arange(flat_e.numel(), device=flat_e.device) - starts[flat_e[order]]
    return (rank < capacity).view_as(indices)


def sinkhorn_routing(logits: Tensor, k: int, iterations: int, temperature: float, capacity_factor: float) -> Routing:
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(widen(logits), dim=-1)
    if num_tokens == 0:
        empty = torch.zeros(0, k, dtype=torch.long, device=logits.device)
        return Routing(logits, probs.new_zeros(0, k), empty, mask=empty.bool(), probs=probs)
    log_pi = sinkhorn_plan(logits, k, iterations, temperature)
    plan_score, indices = torch.topk(log_pi, k, dim=-1)
    capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
    mask = cap_per_expert(indices, plan_score, capacity)
    chosen = probs.gather(1, indices)
    weights = chosen / chosen.sum(-1, keepdim=True) * mask
    return Routing(logits, weights, indices, mask=mask, probs=probs)


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """Balanced top-k by Sinkhorn, at most c tokens per expert (`SinkhornOptions`)."""

    Options = SinkhornOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        o = self.options
        if not isinstance(o.iterations, int) or o.iterations < 1:
            raise ConfigError(f"router_options.iterations={o.iterations!r}: expected a positive integer")
        for name in ("temperature", "capacity_factor"):
            if not getattr(o, name) > 0:
                raise ConfigError(f"router_options.{name}={getattr(o, name)}: expected a positive number")

    def rule(self, logits: Tensor, k: int) -> Routing:
        o = self.options
        return sinkhorn_routing(logits, k, o.iterations, o.temperature, o.capacity_factor)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None
