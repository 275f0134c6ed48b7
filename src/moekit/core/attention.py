"""Attention experts: a mixture-of-attention layer whose experts are attention heads.

E experts, each a group of n heads (`heads_per_expert`, 1 by default: an expert is one head) with its own query and
output projections (q_proj[e]: [n d, H], o_proj[e]: [H, n d]); keys and values come from one projection shared by
every expert (`shared_kv=True`, as in Mixture of Attention Heads and ModuleFormer, and BAM's KV sharing) or from one
per expert. With n > 1 an expert is a whole multi-head attention (BAM's attention experts, upcycled from a dense
model's attention). Head h of expert e uses rows h d .. (h + 1) d of its projections. Any registered router
(`moekit.core.routers`) picks k experts per token with weights w:

    y_t = sum_{j<k} w_tj o_proj[e_tj] concat_h( sum_{s} a^{e_tj,h}_{ts} v^{e_tj,h}_s )

with, over the keys s allowed to token t (s <= t when causal),
    softmax:        a_ts = softmax_s(q_t . k_s / sqrt d)
    stickbreaking:  beta_ts = sigmoid(q_t . k_s / sqrt d),  a_ts = beta_ts prod_{s<r<=t} (1 - beta_tr)
(ModuleFormer's stick-breaking heads: the nearest key takes its share of the stick first, the weights sum to at
most 1 and no position encoding is needed; causal only). Only the chosen heads' queries, scores and output
projections are computed per token; keys and values are computed for every position (any token may choose any
head). `forward(x, routing=...)` takes a routing made elsewhere (Union of Experts' hierarchical routing does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.layer import LossWeights, aux_losses
from moekit.core.routers import build_router
from moekit.core.routing import Routing
from moekit.errors import ConfigError, ShapeError

KINDS = ("softmax", "stickbreaking")


@dataclass
class AttentionExpertsConfig:
    """hidden_size H; num_heads E (the experts); k experts per token; head_dim d (default H // (k n), so k experts
    of n heads of width d cost about one dense attention's projections); heads_per_expert n; shared_kv: one K/V
    projection for every expert;
    kind: softmax | stickbreaking; causal: token t attends to s <= t; router / router_options: any registered
    router over the heads; loss_weights: the layer's balance / z / seq weights (non-negative)."""

    hidden_size: int
    num_heads: int
    k: int = 2
    head_dim: int | None = None
    shared_kv: bool = True
    kind: str = "softmax"
    causal: bool = True
    router: str = "topk"
    router_options: dict[str, Any] | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)
    heads_per_expert: int = 1

    def check(self) -> None:
        for name in ("hidden_size", "num_heads", "k", "heads_per_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if self.k > self.num_heads:
            raise ConfigError(f"k={self.k}: expected at most num_heads={self.num_heads}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ConfigError(f"head_dim={self.head_dim!r}: expected a positive integer or None")
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "stickbreaking" and not self.causal:
            raise ConfigError("kind='stickbreaking': expected causal=True (the stick is broken from the nearest "
                              "earlier key)")
        check_loss_weights(self.loss_weights)


def check_loss_weights(w: LossWeights, where: str = "loss_weights") -> None:
    for name in ("balance", "z", "seq"):
        value = getattr(w, name)
        if not value >= 0:
            raise ConfigError(f"{where}.{name}={value!r}: expected a non-negative number")


@dataclass
class AttentionOutput:
    """hidden [B, T, H]; routing over the B*T flattened tokens; losses (unweighted) and aux_loss (weighted sum)."""

    hidden: Tensor
    routing: Routing
    losses: dict[str, Tensor]
    aux_loss: Tensor


def attention_weights(scores: Tensor, allowed: Tensor, kind: str) -> Tensor:
    """scores, allowed [..., S] (allowed: bool, keys in order) -> a [..., S], 0 where not allowed.
    softmax: a row with no allowed key is all 0. stickbreaking: log a_s = log beta_s + sum_{r>s, allowed} log(1 -
    beta_r), computed in log space."""
    if kind == "softmax":
        masked = scores.masked_fill(~allowed, float("-inf"))
        a = torch.softmax(masked, dim=-1)
        return torch.nan_to_num(a, nan=0.0)
    log_beta = F.logsigmoid(scores)
    log_rest = F.logsigmoid(-scores) * allowed
    after = torch.flip(torch.cumsum(torch.flip(log_rest, [-1]), -1), [-1]) - log_rest  # sum over r > s
    return torch.exp(log_beta + after) * allowed


class MixtureOfAttention(nn.Module):
    """Routed attention heads (`AttentionExpertsConfig`); `forward(x [B, T, H]) -> AttentionOutput`."""

    def __init__(self, config: AttentionExpertsConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        config.check()
        self.config = config
        h, e, n = config.hidden_size, config.num_heads, config.heads_per_expert
        self.head_dim = config.head_dim or max(1, h // (config.k * n))
        width = n * self.head_dim
        kv_heads = 1 if config.shared_kv else e
        kw = {"dtype": dtype, "device": device}
        self.q_proj = nn.Parameter(torch.empty(e, width, h, **kw))
        self.k_proj = nn.Parameter(torch.empty(kv_heads, width, h, **kw))
        self.v_proj = nn.Parameter(torch.empty(kv_heads, width, h, **kw))
        self.o_proj = nn.Parameter(torch.empty(e, h, width, **kw))
        for p, fan_in in ((self.q_proj, h), (self.k_proj, h), (self.v_proj, h), (self.o_proj, width)):
            nn.init.uniform_(p, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        self.router = build_router(config.router, h, e, config.k, config.router_options).to(**kw)

    @property
    def num_heads(self) -> int:
        return self.q_proj.shape[0]

    def route(self, x: Tensor) -> Routing:
        """x [B, T, H] -> the router's choice of heads for the B*T tokens."""
        return self.router(x.reshape(-1, x.shape[-1]))

    def forward(self, x: Tensor, routing: Routing | None = None) -> AttentionOutput:
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ShapeError(f"x: expected shape [B, T, {self.config.hidden_size}], got {list(x.shape)}")
        batch, seq, hidden = x.shape
        if routing is None:
            routing = self.route(x)
        if routing.indices.shape[0] != batch * seq:
            raise ShapeError(f"routing: expected {batch * seq} tokens, got {routing.indices.shape[0]}")
        if routing.num_tokens and int(routing.indices.max()) >= self.num_heads:
            raise ShapeError(f"routing: head index {int(routing.indices.max())} >= num_heads={self.num_heads}")
        y = self.heads(x, routing)
        losses, aux = aux_losses(routing, seq, self.config.loss_weights, self.router)
        return AttentionOutput(y, routing, losses, aux)

    def heads(self, x: Tensor, routing: Routing) -> Tensor:
        """The routed sum of the chosen heads' outputs, [B, T, H]."""
        batch, seq, hidden = x.shape
        n, d = self.config.heads_per_expert, self.head_dim
        flat = x.reshape(-1, hidden)
        keys = torch.einsum("th,ewh->tew", flat, self.k_proj).view(batch, seq, -1, n, d)
        values = torch.einsum("th,ewh->tew", flat, self.v_proj).view(batch, seq, -1, n, d)
        positions = torch.arange(seq, device=x.device)
        token_b = torch.arange(batch * seq, device=x.device) // seq
        token_t = torch.arange(batch * seq, device=x.device) % seq
        live = routing.slot_mask() & (routing.weights != 0)
        out = torch.zeros(batch * seq, hidden, dtype=torch.promote_types(x.dtype, routing.weights.dtype),
                          device=x.device)
        scale = 1.0 / math.sqrt(self.head_dim)
        for e in torch.unique(routing.indices[live]).tolist():
            tok, slot = torch.nonzero((routing.indices == e) & live, as_tuple=True)
            kv = 0 if self.config.shared_kv else e
            q = (flat[tok] @ self.q_proj[e].T).view(-1, n, d)  # [m, n, d]
            k_rows, v_rows = keys[token_b[tok], :, kv], values[token_b[tok], :, kv]  # [m, S, n, d]
            scores = torch.einsum("mnd,msnd->mns", q, k_rows) * scale
            if self.config.causal:
                allowed = (positions.unsqueeze(0) <= token_t[tok].unsqueeze(1)).unsqueeze(1)  # [m, 1, S]
            else:
                allowed = torch.ones(len(tok), 1, seq, dtype=torch.bool, device=x.device)
            a = attention_weights(scores, allowed.expand_as(scores), self.config.kind)
            head_out = torch.einsum("mns,msnd->mnd", a, v_rows).reshape(len(tok), n * d) @ self.o_proj[e].T
            w = routing.weights[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, (w * head_out).to(out.dtype))
        return out.to(x.dtype).view(batch, seq, hidden)

    @torch.no_grad()
    def add_heads(self, n: int) -> None:
        """ModuleFormer's extension: n new heads (fresh q / o projections and router rows; per-head K/V too when
        not shared). Existing heads and their router rows are unchanged."""
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r}: expected a positive integer")
        h = self.config.hidden_size

        def grow(p: nn.Parameter, fan_in: int) -> nn.Parameter:
            fresh = torch.empty(n, *p.shape[1:], dtype=p.dtype, device=p.device)
            nn.init.uniform_(fresh, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
            return nn.Parameter(torch.cat([p.detach(), fresh]))

        self.q_proj, self.o_proj = grow(self.q_proj, h), grow(self.o_proj, self.head_dim)
        if not self.config.shared_kv:
            self.k_proj, self.v_proj = grow(self.k_proj, h), grow(self.v_proj, h)
        self._resize_router(torch.arange(self.router.num_experts), n)

    @torch.no_grad()
    def prune_heads(self, keep: list[int]) -> None:
        """ModuleFormer's pruning: keep only the heads in `keep` (in that order); the router keeps their rows."""
        e = self.num_heads
        if not keep or len(set(keep)) != len(keep) or not all(0 <= i < e for i in keep):
            raise ConfigError(f"keep={keep!r}: expected distinct head indices in [0, {e})")
        if len(keep) < self.router.k:
            raise ConfigError(f"keep: {len(keep)} heads; expected at least k={self.router.k}")
        idx = torch.tensor(keep, device=self.q_proj.device)
        self.q_proj, self.o_proj = nn.Parameter(self.q_proj[idx].clone()), nn.Parameter(self.o_proj[idx].clone())
        if not self.config.shared_kv:
            self.k_proj, self.v_proj = nn.Parameter(self.k_proj[idx].clone()), nn.Parameter(self.v_proj[idx].clone())
        self._resize_router(idx.cpu(), 0)

    def _resize_router(self, rows: Tensor, extra: int) -> None:
        """Keep router rows `rows` and append `extra` fresh ones (routers with a `weight [E, H]` only)."""
        router = self.router
        weight = getattr(router, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.shape[0] != router.num_experts:
            raise ConfigError(f"router {router.name!r}: adding or pruning heads needs a router with one weight row "
                              "per head (e.g. 'topk')")
        h = self.config.hidden_size
        fresh = torch.empty(extra, h, dtype=weight.dtype, device=weight.device)
        nn.init.uniform_(fresh, -1.0 / math.sqrt(h), 1.0 / math.sqrt(h))
        router.weight = nn.Parameter(torch.cat([weight.detach()[rows.to(weight.device)], fresh]))
        if router.bias is not None:
            bias = router.bias.detach()[rows.to(weight.device)]
            router.bias = nn.Parameter(torch.cat([bias, bias.new_zeros(extra)]))
        router.num_experts = router.weight.shape[0]
        self.config.num_heads = router.num_experts
