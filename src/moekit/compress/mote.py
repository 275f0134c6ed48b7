"""MoTE: Mixture of Ternary Experts, upcycled from a dense feed-forward layer.

The pre-trained FFN stays in full precision as a shared expert every token uses; E routed experts start as copies
of it and are trained ternary (quantization-aware, the BitNet b1.58 absmean rule moekit's `ternary` format uses):
each [out, in] weight is split into groups of `group_size` consecutive inputs of a row, s = mean |w| over the group,
w_t = clamp(round(w / s), -1, 1) s, and the forward pass uses w + (w_t - w).detach() (straight-through: the latent
full-precision w receives the gradient of w_t). The layer is

    y = FFN(x) + sum_{e in topk(x)} g_e(x) T_e(x),     T_e the ternary expert e, g the top-k softmax router,

so at initialisation it is the dense layer plus the ternarized copies' routed contribution. `export_ternary` writes
the routed experts in moekit's ternary storage (`core/experts/qformat.py`, 2 bits a weight plus fp16 scales).
Today's post-training path (`moekit compress --quant ternary`) quantizes a trained MoE's experts without training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.experts.qformat import effective_group
from moekit.core.routing import Routing, softmax_topk
from moekit.errors import ConfigError, ShapeError


def ternarize(w: Tensor, group_size: int) -> Tensor:
    """w [out, in] -> its ternary value clamp(round(w / s), -1, 1) s, s = mean |w| per group (same shape)."""
    out_f, in_f = w.shape
    g = effective_group(in_f, group_size)
    pad = (-in_f) % g
    grouped = F.pad(w, (0, pad)).view(out_f, -1, g)
    scale = grouped.abs().mean(-1, keepdim=True).clamp_min(1e-8)
    q = torch.clamp(torch.round(grouped / scale), -1, 1) * scale
    return q.view(out_f, -1)[:, :in_f]


def ste_ternary(w: Tensor, group_size: int) -> Tensor:
    """The ternary value in the forward pass, the identity in the backward pass."""
    return w + (ternarize(w.detach(), group_size) - w).detach()


@dataclass
class MoTEConfig:
    """num_experts E, k routed experts per token, group_size of the absmean scales, freeze_shared: keep the
    upcycled FFN fixed (only the router and the ternary experts train)."""

    num_experts: int = 4
    k: int = 1
    group_size: int = 64
    freeze_shared: bool = True

    def check(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"num_experts={self.num_experts!r}: expected a positive integer")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.num_experts:
            raise ConfigError(f"k={self.k!r}: expected an integer from 1 to num_experts={self.num_experts}")
        if not isinstance(self.group_size, int) or self.group_size < 4 or self.group_size % 4:
            raise ConfigError(f"group_size={self.group_size!r}: expected a positive multiple of 4")


class MoTELayer(nn.Module):
    """Shared full-precision FFN (up [I, H], down [H, I], GELU) + E ternary routed experts (`MoTEConfig`)."""

    def __init__(self, up: Tensor, down: Tensor, config: MoTEConfig | None = None, noise: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config or MoTEConfig()
        self.config.check()
        width, hidden = up.shape
        if down.shape != (hidden, width):
            raise ShapeError(f"down {list(down.shape)}: expected [{hidden}, {width}] for up [{width}, {hidden}]")
        e = self.config.num_experts
        self.shared_up = nn.Parameter(up.detach().clone(), requires_grad=not self.config.freeze_shared)
        self.shared_down = nn.Parameter(down.detach().clone(), requires_grad=not self.config.freeze_shared)

        def copies(w: Tensor) -> Tensor:
            jitter = noise * w.abs().mean() * torch.randn((e, *w.shape), generator=generator)
            return w.detach().unsqueeze(0).repeat(e, 1, 1) + jitter.to(w.dtype)

        self.up = nn.Parameter(copies(up))  # [E, I, H] latent full precision
        self.down = nn.Parameter(copies(down))  # [E, H, I]
        self.router = nn.Linear(hidden, e, bias=False)
        nn.init.uniform_(self.router.weight, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def expert(self, x: Tensor, e: int) -> Tensor:
        g = self.config.group_size
        return F.gelu(x @ ste_ternary(self.up[e], g).T) @ ste_ternary(self.down[e], g).T

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        """x [T, H] -> (y [T, H], routing)."""
        y = F.gelu(x @ self.shared_up.T) @ self.shared_down.T
        routing = softmax_topk(self.router(x), self.config.k, normalize=True)
        for e in torch.unique(routing.indices).tolist():
            tok, slot = torch.nonzero(routing.indices == e, as_tuple=True)
            y = y.index_add(0, tok, routing.weights[tok, slot].unsqueeze(-1).to(x.dtype) * self.expert(x[tok], e))
        return y, routing

    @torch.no_grad()
    def export_ternary(self) -> dict[str, list[tuple[Tensor, Tensor | None]]]:
        """{'up': [(codes, scales) per expert], 'down': [...]} in moekit's ternary storage format."""
        from moekit.core.experts.qformat import encode

        g = self.config.group_size
        return {name: [encode(w[e].float(), "ternary", g) for e in range(w.shape[0])]
                for name, w in (("up", self.up), ("down", self.down))}
