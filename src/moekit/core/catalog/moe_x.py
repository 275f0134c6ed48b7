"""MoE-X (Mixture of Experts Made Intrinsically Interpretable): ReLU experts and sparsity-aware routing.

Experts are one-hidden-layer ReLU MLPs (whatever the layer's `activation`), E_e(x) = W_dec[e] relu(W_enc[e] x +
b_enc[e]) (enc [E, I, H], dec [E, H, I]), so the layer is a wide sparse MLP of E I neurons of which a token uses at
most k I. The router prefers the experts whose activation on the token would be sparsest, without computing them:
over expert e's neurons j, the pre-activation z_j = w_j . x + b_j is modelled as Gaussian with

    mu_e(x) = mean_j(w_j) . x + mean_j(b_j),   sigma_e^2(x) = sum_h x_h^2 var_j(w_{j,h}) + var_j(b_j),

so the expected fraction of active neurons is rho_e(x) = Phi(mu_e / sigma_e) (cost O(E H) per token, like a
linear router). logits_e = -rho_e(x) / temperature; the top-k are kept and weighted by a softmax over them. The
logits depend on the encoders, so routing is trained through them (no separate router weight). `estimate="exact"`
counts the active neurons instead (every expert's encoder runs; for checks). moekit's reading of the paper's
gating: the mean / diagonal-variance Gaussian is this module's; the paper's exact estimator may differ.
`Routing.aux["active"]` [T] is the number of active neurons a token uses (summed over its experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.catalog._util import drop_weight
from moekit.core.experts import Activation
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, topk_softmax, widen
from moekit.core.step import Dispatcher, Step
from moekit.errors import ConfigError


class ReLUExperts(nn.Module):
    """E ReLU MLPs: enc [E, I, H] + b_enc [E, I], dec [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.enc = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **kw))
        self.b_enc = nn.Parameter(torch.zeros(num_experts, intermediate_size, **kw))
        self.dec = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        for w, fan_in in ((self.enc, hidden_size), (self.dec, intermediate_size)):
            nn.init.uniform_(w, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def activations(self, x: Tensor, e: int) -> Tensor:
        """relu(W_enc[e] x + b_enc[e]) [n, I]."""
        return torch.relu(x @ self.enc[e].T + self.b_enc[e])

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sum_j w_j E_{i_j}(x) [T, H], active neurons per token [T])."""
        out = torch.zeros_like(x)
        active = torch.zeros(x.shape[0], device=x.device)
        live = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
        for e in torch.unique(indices[live]).tolist():
            tok, slot = torch.nonzero((indices == e) & live, as_tuple=True)
            h = self.activations(x[tok], e)
            active.index_add_(0, tok, (h > 0).sum(-1).float())
            out.index_add_(0, tok, (weights[tok, slot].unsqueeze(-1).to(x.dtype) * (h @ self.dec[e].T)))
        return out, active


def expected_active_fraction(x: Tensor, experts: ReLUExperts) -> Tensor:
    """rho [T, E]: Phi(mu_e(x) / sigma_e(x)), the Gaussian estimate of each expert's active-neuron fraction."""
    enc, b = widen(experts.enc), widen(experts.b_enc)  # [E, I, H], [E, I]
    x = widen(x)
    mu = x @ enc.mean(1).T + b.mean(1)  # [T, E]
    var = (x * x) @ enc.var(1, unbiased=False).T + b.var(1, unbiased=False)
    return 0.5 * (1 + torch.erf(mu / torch.sqrt(2 * var.clamp_min(1e-12))))


@torch.no_grad()
def exact_active_fraction(x: Tensor, experts: ReLUExperts) -> Tensor:
    """[T, E]: the fraction of each expert's neurons that are active on each token (every encoder runs)."""
    return torch.stack([(experts.activations(x, e) > 0).float().mean(-1) for e in range(experts.num_experts)], -1)


@dataclass
class MoEXOptions(RouterOptions):
    """temperature: logits = -rho / temperature. estimate: 'gaussian' (the cheap estimate) or 'exact'."""

    temperature: float = 0.1
    estimate: str = "gaussian"


@register_router("moe_x")
class MoEXRouter(Router):
    """Sparsity-aware routing over ReLU experts (`MoEXOptions`)."""

    Options = MoEXOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if not self.options.temperature > 0:
            raise ConfigError(f"router_options.temperature={self.options.temperature!r}: expected a positive number")
        if self.options.estimate not in ("gaussian", "exact"):
            raise ConfigError(f"router_options.estimate={self.options.estimate!r}: expected 'gaussian' or 'exact'")
        drop_weight(self)

    def make_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation,  # noqa: ARG002
                     bias: bool, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        if bias:
            raise ConfigError("router 'moe_x': bias=True is not supported (the ReLU experts have an encoder bias)")
        return ReLUExperts(num_experts, hidden_size, intermediate_size, dtype, device)

    def sparsity_logits(self, x: Tensor, experts: ReLUExperts) -> Tensor:
        rho = exact_active_fraction(x, experts) if self.options.estimate == "exact" else \
            expected_active_fraction(x, experts)
        return -rho / self.options.temperature

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        raise ConfigError("router 'moe_x' routes from its experts' encoders; call the MoE layer, not the router")

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:  # noqa: ARG002
        k = self.check_input(x, k)
        if dispatcher.capacity_factor is not None:
            raise ConfigError("router 'moe_x': capacity_factor must be None")
        experts = dispatcher.experts
        logits = self.sparsity_logits(x, experts)
        routing = topk_softmax(logits, k)
        out, active = experts(x, routing.weights, routing.indices)
        routing.aux["active"] = active
        return Step(out, routing, routing.counts(), 0)
