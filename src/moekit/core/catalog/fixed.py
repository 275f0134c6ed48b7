"""Routers that are not learned: hash routing by token id, and SMoE-Dropout's fixed random router.

Hash layers (Roller et al., Hash Layers For Large Sparse Models): expert_j(t) = (h(id_t) + j) mod E for slot
j < k, h(id) = (id * 2654435761 + seed) mod 2^32, each slot weighted 1/k. Needs the token ids.

SMoE-Dropout (Sparse MoE as the New Dropout): w = topk(softmax(x R^T)) renormalised, with R random and never
trained; k grows linearly from k_start to k_end over training, k_t = round(k_start + (k_end - k_start) t / T),
so the trained model works at any k ("self-slimmable": pass `k` to the layer at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.catalog._util import drop_weight, freeze_weight
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, check_k, softmax_topk
from moekit.errors import ConfigError, ShapeError

_HASH_MULT = 2654435761
_HASH_MOD = 2**32


@dataclass
class HashOptions(RouterOptions):
    """seed: added inside the hash, so layers given different seeds route differently."""

    seed: int = 0


def hash_routing(token_ids: Tensor, num_experts: int, k: int, seed: int = 0) -> Routing:
    """token_ids [T] -> Routing with k distinct experts per token, each weighted 1/k (uniform probs)."""
    h = (token_ids.long() * _HASH_MULT + seed) % _HASH_MOD
    indices = (h.unsqueeze(-1) + torch.arange(k, device=token_ids.device)) % num_experts
    num_tokens = token_ids.shape[0]
    logits = torch.zeros(num_tokens, num_experts, device=token_ids.device)
    weights = torch.full((num_tokens, k), 1.0 / k, device=token_ids.device)
    return Routing(logits, weights, indices, probs=torch.full_like(logits, 1.0 / num_experts))


@register_router("hash")
class HashRouter(Router):
    """Experts chosen by a fixed hash of the token id (`MoE(..., token_ids=input_ids)`); nothing to train."""

    Options = HashOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        drop_weight(self)

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:
        k = self.check_input(hidden, k)
        if token_ids is None:
            raise ConfigError("router 'hash' routes by token id: expected MoE(hidden, token_ids=input_ids)")
        if token_ids.shape != hidden.shape[:1]:
            raise ShapeError(f"token_ids: expected shape [{hidden.shape[0]}], got {list(token_ids.shape)}")
        return hash_routing(token_ids, self.num_experts, k, self.options.seed)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None


@dataclass
class SMoEDropoutOptions(RouterOptions):
    """k_start / k_end: experts per token at the first and last training step (k_end None: all experts)."""

    k_start: int = 1
    k_end: int | None = None


def scheduled_k(step: int, total_steps: int, k_start: int, k_end: int) -> int:
    """round(k_start + (k_end - k_start) * step / total_steps), clamped to [k_start, k_end]."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return int(round(k_start + (k_end - k_start) * frac))


@register_router("smoe_dropout")
class SMoEDropoutRouter(Router):
    """A fixed random router whose k follows a schedule in training (`set_step`); any k at inference. In
    training the scheduled k is used; in eval the layer's k unless a per-call k is given."""

    Options = SMoEDropoutOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        o = self.options
        self.k_end = num_experts if o.k_end is None else o.k_end
        check_k(o.k_start, num_experts, "router_options.k_start")
        check_k(self.k_end, num_experts, "router_options.k_end")
        if o.k_start > self.k_end:
            raise ConfigError(f"router_options.k_start={o.k_start}: expected at most k_end={self.k_end}")
        self.train_k = o.k_start
        freeze_weight(self)

    def set_step(self, step: int, total_steps: int) -> None:
        self.train_k = scheduled_k(step, total_steps, self.options.k_start, self.k_end)

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        if k is None and self.training:
            k = self.train_k
        k = self.check_input(hidden, k)
        return softmax_topk(self.checked_logits(hidden), k, normalize=True)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None
