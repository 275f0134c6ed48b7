"""Confidence-gated weak and strong experts (Mowst: Mixture of Weak & Strong Experts on Graphs), in an MoE layer.

The weak expert is a small dense MLP u = W(x); the strong expert is the routed experts, s = sum_{i in topk}
w_i E_i(x). The weak expert's confidence comes from the dispersion of its own prediction, the negative
normalised entropy of softmax(u): D = 1 - H(softmax(u)) / log H, and c = sigmoid(a D + b) with learned a, b.
Training mixes softly, y = c u + (1 - c) s. At inference a confident token (c >= threshold) uses the weak expert
alone (y = u, the strong experts do not run for it) and the others y = c u + (1 - c) s. moekit adds one loss of
its own, `strong_use` = mean_t (1 - c_t), weighted by `cost_weight`, the price of calling the strong experts
(Mowst's objective is on task predictions, which a layer does not see). c starts below the threshold (a = 1,
b = -1, so c < 0.5), Mowst's bias towards the strong expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.experts import Activation, SharedExperts
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, softmax_topk
from moekit.core.step import Dispatcher, Step


@dataclass
class WeakStrongOptions(RouterOptions):
    """weak_intermediate_size: the weak MLP's width (None: half the expert width). threshold: confidence from
    which a token skips the strong experts at inference. cost_weight: weight of the `strong_use` loss."""

    weak_intermediate_size: int | None = None
    threshold: float = 0.5
    cost_weight: float = 0.01


def dispersion(u: Tensor) -> Tensor:
    """[T, H] -> [T]: 1 - H(softmax(u)) / log H, 0 for a flat prediction, 1 for a one-hot one."""
    p = torch.softmax(u.float(), dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    return 1 - entropy / math.log(u.shape[-1]) if u.shape[-1] > 1 else torch.ones_like(entropy)


@register_router("weak_strong")
class WeakStrongRouter(Router):
    """A weak MLP and the routed (strong) experts, gated by the weak expert's confidence (`WeakStrongOptions`)."""

    Options = WeakStrongOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        self.confidence_scale = nn.Parameter(torch.ones(()))
        self.confidence_shift = nn.Parameter(torch.full((), -1.0))  # c < 0.5 at first: every token uses strong

    def make_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation, bias: bool,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        width = self.options.weak_intermediate_size or max(1, intermediate_size // 2)
        self.weak = SharedExperts(hidden_size, width, act, dtype=dtype, device=device)
        return super().make_experts(num_experts, hidden_size, intermediate_size, act, bias, dtype, device)

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, normalize=True)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:
        u = self.weak(x)
        c = torch.sigmoid(self.confidence_scale * dispersion(u) + self.confidence_shift)  # [T]
        strong = self(x, k, token_ids)
        mask = torch.ones_like(strong.indices, dtype=torch.bool)
        weak_weight = c
        if not self.training:
            confident = c >= self.options.threshold
            mask = mask & ~confident.unsqueeze(-1)
            weak_weight = torch.where(confident, torch.ones_like(c), c)
        routing = Routing(strong.logits, strong.weights * (1 - c).unsqueeze(-1) * mask, strong.indices, mask=mask,
                          probs=strong.probs, aux={"confidence": c})
        step = dispatcher(x, routing)
        out = step.out + (weak_weight.unsqueeze(-1) * u.float()).to(step.out.dtype)
        return Step(out, routing, step.counts, step.dropped)

    def extra_losses(self, routing: Routing) -> dict[str, tuple[Tensor, float]]:
        c = routing.aux["confidence"]
        return {"strong_use": ((1 - c).mean() if c.numel() else c.new_zeros(()), self.options.cost_weight)}
