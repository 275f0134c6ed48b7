"""Layerwise recurrent router (RMoE: Layerwise Recurrent Router for Mixture-of-Experts).

Layer l projects its input and runs a GRU cell over depth: r_l = GRU(x_l P_l^T, r_{l-1}) with r_0 = 0, and routes
with logits = r_l W_l^T, w = topk(softmax(logits)) renormalised. The state r carries the routing history of the
layers below to this one; gradients flow through it. `moekit.core.link_layers(moes)` tells each layer which one is
below it (call it once after building the stack); an unlinked layer, and the first layer of a linked stack, start
from r = 0 on every forward. Each layer owns its projection and GRU cell (RMoE shares nothing it needs to save
twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.catalog._util import resize_weight
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, softmax_topk
from moekit.errors import ConfigError, RoutingError


@dataclass
class RecurrentOptions(RouterOptions):
    """state_size: width of the projection and of the GRU state."""

    state_size: int = 64


@register_router("recurrent")
class RecurrentRouter(Router):
    """Routing from a GRU state carried across layers (`RecurrentOptions`)."""

    Options = RecurrentOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        size = self.options.state_size
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"router_options.state_size={size!r}: expected a positive integer")
        self.proj = nn.Linear(hidden_size, size, bias=False)
        self.gru = nn.GRUCell(size, size)
        resize_weight(self, num_experts, size)
        self.__dict__["below"] = None  # the router of the layer below (not a submodule: it is not ours to save)
        self.state: Tensor | None = None  # r_l [T, S] of the last forward, read by the layer above

    def link(self, below: Router | None) -> None:
        if below is not None and not isinstance(below, RecurrentRouter):
            below = None  # a non-recurrent layer below carries no state: start fresh
        if below is not None and below.options.state_size != self.options.state_size:
            raise ConfigError(f"router 'recurrent': state_size={self.options.state_size} but the layer below has "
                              f"{below.options.state_size}; expected equal state sizes in a linked stack")
        self.__dict__["below"] = below

    def previous_state(self, hidden: Tensor) -> Tensor:
        below = self.__dict__["below"]
        if below is None:
            return hidden.new_zeros(hidden.shape[0], self.options.state_size, dtype=self.gru.weight_ih.dtype)
        if below.state is None or below.state.shape[0] != hidden.shape[0]:
            raise RoutingError("router 'recurrent': the layer below has not run on these tokens; expected the "
                               "linked layers to run in order, bottom first")
        return below.state

    def logits(self, hidden: Tensor) -> Tensor:
        z = self.proj(hidden.to(self.proj.weight.dtype))
        self.state = self.gru(z, self.previous_state(hidden))
        return F.linear(self.state, self.weight, self.bias)

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, normalize=True)
