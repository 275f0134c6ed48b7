"""Small module, big module or skip, per token (Duo-LLM: a framework for studying adaptive computation).

A three-way router pi = softmax(x V^T) over {skip, small, big} picks one path per token by argmax: skip returns 0
(the block's residual carries the token), small is a dense MLP narrower than the layer (pi_small * S(x)), big is
the routed experts (pi_big * sum_{i in topk} w_i E_i(x), routed by this module's own weight). The chosen path's
probability scales its output, so the three-way router learns from the language-model loss as a Switch router
does; the `compute` loss mean_t sum_j pi_{t,j} cost_j (cost 0 for skip, the small MLP's width over the big path's
k I for small, 1 for big), weighted by `cost_weight`, prices the paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.experts import Activation, SharedExperts
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, softmax_topk, widen
from moekit.core.step import Dispatcher, Step

SKIP, SMALL, BIG = 0, 1, 2


@dataclass
class SmallBigSkipOptions(RouterOptions):
    """small_intermediate_size: the small MLP's width (None: half the expert width). cost_weight: weight of the
    `compute` loss."""

    small_intermediate_size: int | None = None
    cost_weight: float = 0.01


@register_router("small_big_skip")
class SmallBigSkipRouter(Router):
    """Per token: skip, a small dense MLP, or the routed experts (`SmallBigSkipOptions`)."""

    Options = SmallBigSkipOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        self.path = nn.Linear(hidden_size, 3, bias=True)
        with torch.no_grad():
            self.path.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # start on the big path

    def make_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation, bias: bool,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        width = self.options.small_intermediate_size or max(1, intermediate_size // 2)
        self.small = SharedExperts(hidden_size, width, act, dtype=dtype, device=device)
        self.small_cost = width / (self.k * intermediate_size)
        return super().make_experts(num_experts, hidden_size, intermediate_size, act, bias, dtype, device)

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, normalize=True)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:
        pi = torch.softmax(widen(self.path(x)), dim=-1)  # [T, 3]
        choice = pi.argmax(-1)
        chosen_p = pi.gather(1, choice.unsqueeze(-1))  # [T, 1]
        big = self(x, k, token_ids)
        mask = (choice == BIG).unsqueeze(-1).expand_as(big.indices)
        routing = Routing(big.logits, big.weights * chosen_p * mask, big.indices, mask=mask, probs=big.probs,
                          aux={"path_probs": pi, "path": choice})
        step = dispatcher(x, routing)
        small_rows = (choice == SMALL).nonzero().squeeze(-1)
        out = step.out
        if small_rows.numel():
            y = self.small(x.index_select(0, small_rows)).float() * chosen_p[small_rows]
            out = out.index_add(0, small_rows, y.to(out.dtype))
        return Step(out, routing, step.counts, step.dropped)

    def extra_losses(self, routing: Routing) -> dict[str, tuple[Tensor, float]]:
        pi = routing.aux["path_probs"]
        cost = torch.tensor([0.0, self.small_cost, 1.0], device=pi.device, dtype=pi.dtype)
        loss = (pi * cost).sum(-1).mean() if pi.shape[0] else pi.new_zeros(())
        return {"compute": (loss, self.options.cost_weight)}
