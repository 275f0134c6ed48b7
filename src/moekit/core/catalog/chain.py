"""Chain-of-Experts (CoE: Unlocking the Communication Power of Mixture-of-Experts Models).

Within one layer the tokens pass C times through the same experts, each iteration with its own router and a
residual between iterations: h_0 = x, h_c = h_{c-1} + sum_{i in topk_c(h_{c-1})} w_{c,i} E_i(h_{c-1}), and the
layer returns h_C - x (the block's own residual adds x back). C iterations of k experts cost what one pass of C k
experts costs. Each iteration's routing has its own Switch balance loss; `balance` is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.losses import switch_balance_loss
from moekit.core.routers import Router, RouterOptions, TopKRouter, register_router
from moekit.core.routing import Routing, softmax_topk
from moekit.core.step import Dispatcher, Step
from moekit.errors import ConfigError


@dataclass
class ChainOptions(RouterOptions):
    """iterations: C, the passes through the experts (each with its own router)."""

    iterations: int = 2


@register_router("chain")
class ChainRouter(Router):
    """C routing iterations over shared experts with a residual between them (`ChainOptions`). This module's own
    weight routes iteration 1; `later[c - 2]` routes iteration c."""

    Options = ChainOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        c = self.options.iterations
        if not isinstance(c, int) or c < 1:
            raise ConfigError(f"router_options.iterations={c!r}: expected a positive integer")
        base = {"bias": self.options.bias, "jitter": self.options.jitter, "logits_fp32": self.options.logits_fp32}
        self.later = nn.ModuleList(TopKRouter(hidden_size, num_experts, k, base) for _ in range(c - 1))

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, normalize=True)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:  # noqa: ARG002
        h = x
        routings, steps = [], []
        for router in [self, *self.later]:
            routing = router(h, k)
            step = dispatcher(h, routing)
            h = h + step.out
            routings.append(routing)
            steps.append(step)
        first = routings[0]
        combined = Routing(
            first.logits, torch.cat([r.weights for r in routings], -1), torch.cat([r.indices for r in routings], -1),
            probs=torch.stack([r.probs for r in routings]).mean(0),
            aux={"iteration_indices": torch.stack([r.indices for r in routings]),
                 "iteration_probs": torch.stack([r.probs for r in routings])})
        counts = torch.stack([s.counts for s in steps]).sum(0)
        return Step(h - x, combined, counts, sum(s.dropped for s in steps))

    def balance_loss(self, routing: Routing) -> Tensor:
        indices, probs = routing.aux["iteration_indices"], routing.aux["iteration_probs"]
        losses = [switch_balance_loss(Routing(p, p, i, probs=p)) for i, p in zip(indices, probs, strict=True)]
        return torch.stack(losses).mean()
