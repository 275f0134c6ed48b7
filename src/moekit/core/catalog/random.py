"""Random routing with stochastic experts (THOR: Taming Sparsely Activated Transformer with Stochastic Experts).

No router. In training each token gets two distinct experts drawn uniformly, e1 != e2; the layer outputs their
mean y = (E_e1(x) + E_e2(x)) / 2 and adds the consistency loss mean_t ||E_e1(x_t) - E_e2(x_t)||^2 / H, so each
expert learns from the data and from the other as a teacher. (THOR samples the pair per batch and regularises the
model's two output distributions with a symmetric KL from two passes; moekit works inside one layer, so it samples
per token and regularises the two expert outputs.) At inference: `random` draws k experts per token, weights 1/k;
`mean` averages all E experts (the expert ensemble).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.catalog._util import drop_weight
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, widen
from moekit.core.step import Dispatcher, Step
from moekit.errors import ConfigError


@dataclass
class RandomOptions(RouterOptions):
    """inference: 'random' (k experts drawn per token) or 'mean' (all experts averaged). consistency_weight:
    weight of the consistency loss in `aux_loss`."""

    inference: str = "random"
    consistency_weight: float = 1.0


def _uniform(num_tokens: int, num_experts: int, device: torch.device) -> tuple[Tensor, Tensor]:
    logits = torch.zeros(num_tokens, num_experts, device=device)
    return logits, torch.full_like(logits, 1.0 / num_experts)


def sample_pair(num_tokens: int, num_experts: int, device: torch.device) -> Tensor:
    """[T, 2] two distinct experts per token, uniform over the E (E - 1) ordered pairs."""
    first = torch.randint(num_experts, (num_tokens,), device=device)
    second = (first + torch.randint(1, num_experts, (num_tokens,), device=device)) % num_experts
    return torch.stack([first, second], dim=-1)


def consistency_loss(y1: Tensor, y2: Tensor) -> Tensor:
    """mean_t ||y1_t - y2_t||^2 / H."""
    if y1.shape[0] == 0:
        return y1.new_zeros((), dtype=torch.float32)
    return (widen(y1) - widen(y2)).square().mean()


@register_router("random")
class RandomRouter(Router):
    """THOR's stochastic experts (`RandomOptions`); no router parameters."""

    Options = RandomOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if num_experts < 2:
            raise ConfigError(f"router 'random': num_experts={num_experts}; expected at least 2 (a pair is sampled)")
        if self.options.inference not in ("random", "mean"):
            raise ConfigError(f"router_options.inference={self.options.inference!r}: expected 'random' or 'mean'")
        drop_weight(self)

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        """The inference rule (training goes through `run`)."""
        k = self.check_input(hidden, k)
        num_tokens, device = hidden.shape[0], hidden.device
        logits, probs = _uniform(num_tokens, self.num_experts, device)
        if self.options.inference == "mean":
            k = self.num_experts
            indices = torch.arange(k, device=device).expand(num_tokens, k)
        else:
            indices = torch.rand(num_tokens, self.num_experts, device=device).topk(k, dim=-1).indices
        return Routing(logits, torch.full((num_tokens, k), 1.0 / k, device=device), indices, probs=probs)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:
        if not self.training:
            return super().run(x, k, token_ids, dispatcher)
        self.check_input(x, k)
        num_tokens, device = x.shape[0], x.device
        pair = sample_pair(num_tokens, self.num_experts, device)
        logits, probs = _uniform(num_tokens, self.num_experts, device)
        ones = torch.ones(num_tokens, 1, device=device)
        y1 = dispatcher(x, Routing(logits, ones, pair[:, :1]))
        y2 = dispatcher(x, Routing(logits, ones, pair[:, 1:]))
        routing = Routing(logits, torch.full((num_tokens, 2), 0.5, device=device), pair, probs=probs,
                          aux={"consistency": consistency_loss(y1.out, y2.out)})
        return Step((y1.out + y2.out) / 2, routing, y1.counts + y2.counts, y1.dropped + y2.dropped)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None

    def extra_losses(self, routing: Routing) -> dict[str, tuple[Tensor, float]]:
        if "consistency" not in routing.aux:
            return {}
        return {"consistency": (routing.aux["consistency"], self.options.consistency_weight)}
