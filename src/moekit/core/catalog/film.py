"""Feature-modulated experts (MoFME: Efficient Deweather Mixture-of-Experts with Uncertainty-aware FiLM).

One shared expert block, and per expert a FiLM scale and shift on its hidden activation:
E_e(x) = W_down (gamma_e * a(x) + beta_e), a(x) = act(W_up x). Since W_down is linear, the routed sum collapses to
one pass: y = W_down ((sum_e w_e gamma_e) * a(x) + sum_e w_e beta_e), so E experts cost one MLP plus 2 E I numbers.
The uncertainty-aware router is an ensemble of M linear heads: mu and sigma^2 are the mean and variance of their
logits, and the routing uses the calibrated logits mu / sqrt(1 + pi sigma^2 / 8) (the probit approximation of
averaging a softmax over a Gaussian), so experts the heads disagree on get flatter weights; top-k, renormalised.
(This is moekit's reading of "uncertainty-aware". The authors' public code, RoyZry98/MoFME-Pytorch
models/moe/film.py, routes at inference with a plain linear top-k softmax, and its experts modulate the shared
activation with per-expert linear maps, E_e(a) = (S_e a + s_e) * a + (H_e a + h_e), then a shared adaptor MLP:
`modulation="linear"` gives that modulation, with the shared down projection in place of the adaptor. Its latest
snapshot (commit 522deb8, "Update film.py") adds a training-only "uncertainty estimation": the router is run 5
times, the top-k weights averaged, their covariance over the runs inverted and each run's deviation from the mean
Mahalanobis-whitened and normalised, and the average of those used as the weights. As written that code cannot be
the paper's rule: the router has no dropout or noise, so the 5 runs are identical, the deviations are zero and the
weights collapse to 0; its sample list also accumulates across layers. So the paper's UaR (a sampled router whose
spread calibrates the weights) is not reproduced here; this router's disagreement of M heads is moekit's stand-in.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.catalog._util import resize_weight
from moekit.core.experts import Activation, linear
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, softmax_topk, widen
from moekit.core.step import Dispatcher, Step
from moekit.errors import ConfigError


class FiLMExperts(nn.Module):
    """E experts sharing one MLP (gate_up_proj [2I, H], down_proj [H, I]) with FiLM gamma / beta [E, I]; with
    `modulation="linear"` also per-expert maps scale_proj / shift_proj [E, I, I] (the authors' code's FME)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 modulation: str = "vector"):
        super().__init__()
        self.modulation = modulation
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act = act
        kw = {"dtype": dtype, "device": device}
        up_width = (2 if act.gated else 1) * intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(up_width, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(hidden_size, intermediate_size, **kw))
        self.gamma = nn.Parameter(torch.ones(num_experts, intermediate_size, **kw))
        self.beta = nn.Parameter(torch.zeros(num_experts, intermediate_size, **kw))
        if modulation == "linear":  # zero maps: the same experts as the vector modulation at initialisation
            self.scale_proj = nn.Parameter(torch.zeros(num_experts, intermediate_size, intermediate_size, **kw))
            self.shift_proj = nn.Parameter(torch.zeros(num_experts, intermediate_size, intermediate_size, **kw))
        for w, fan_in in ((self.gate_up_proj, hidden_size), (self.down_proj, intermediate_size)):
            nn.init.uniform_(w, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e alone on x [n, H] -> [n, H]."""
        return linear(self.modulate(self.act(linear(x, self.gate_up_proj)), e), self.down_proj)

    def modulate(self, a: Tensor, e: int) -> Tensor:
        """FiLM of expert e on the shared activation a [n, I]."""
        if self.modulation == "linear":
            return (linear(a, self.scale_proj[e]) + self.gamma[e]) * a + linear(a, self.shift_proj[e]) + self.beta[e]
        return self.gamma[e] * a + self.beta[e]

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """x [T, H], weights / indices [T, k] (0 weight on padded slots) -> sum_j w_j E_{i_j}(x) [T, H]."""
        w = weights.to(x.dtype).unsqueeze(-1)  # [T, k, 1]
        a = self.act(linear(x, self.gate_up_proj))
        mixed = (w * self.gamma[indices]).sum(1) * a + (w * self.beta[indices]).sum(1)  # [T, I]
        if self.modulation == "linear":  # + sum_j w_j (S_e a) * a + w_j H_e a, one expert at a time
            for e in torch.unique(indices).tolist():
                tok, slot = torch.nonzero(indices == e, as_tuple=True)
                at = a[tok]
                part = linear(at, self.scale_proj[e]) * at + linear(at, self.shift_proj[e])
                mixed = mixed.index_add(0, tok, w[tok, slot] * part)
        return linear(mixed, self.down_proj)


@dataclass
class FiLMOptions(RouterOptions):
    """heads: M, the router ensemble whose disagreement is the routing uncertainty. modulation: 'vector'
    (gamma_e, beta_e) or 'linear' (plus per-expert I x I maps: (S_e a + gamma_e) * a + H_e a + beta_e)."""

    heads: int = 4
    modulation: str = "vector"


def calibrated_logits(head_logits: Tensor) -> Tensor:
    """[T, M, E] -> [T, E]: mu / sqrt(1 + pi var / 8) over the M heads (var 0 with one head)."""
    mu = head_logits.mean(1)
    var = head_logits.var(1, unbiased=False)
    return mu / torch.sqrt(1 + math.pi * var / 8)


@register_router("film")
class FiLMRouter(Router):
    """Uncertainty-aware router over FiLM-modulated experts (`FiLMOptions`)."""

    Options = FiLMOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if not isinstance(self.options.heads, int) or self.options.heads < 1:
            raise ConfigError(f"router_options.heads={self.options.heads!r}: expected a positive integer")
        if self.options.modulation not in ("vector", "linear"):
            raise ConfigError(f"router_options.modulation={self.options.modulation!r}: expected 'vector' or 'linear'")
        resize_weight(self, self.options.heads * num_experts, hidden_size)

    def make_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation, bias: bool,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        if bias:
            raise ConfigError("router 'film': bias=True is not supported (FiLM experts share one bias-free MLP)")
        return FiLMExperts(num_experts, hidden_size, intermediate_size, act, dtype, device, self.options.modulation)

    def logits(self, hidden: Tensor) -> Tensor:
        heads = super().logits(hidden).view(hidden.shape[0], self.options.heads, self.num_experts)
        return calibrated_logits(widen(heads))

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, normalize=True)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:
        if dispatcher.capacity_factor is not None:
            raise ConfigError("router 'film': capacity_factor must be None (the FiLM experts run as one MLP)")
        routing = self(x, k, token_ids)
        out = dispatcher.experts(x, routing.weights, routing.indices)
        return Step(out, routing, routing.counts(), 0)
