"""THOR's stochastic experts as the paper trains them (Taming Sparsely Activated Transformer with Stochastic Experts).

Each step, every THOR layer draws a pair of experts (e_1, e_2) for the whole batch (distinct by default, the
paper's "pair"; `pair="independent"` draws each pass's expert on its own, as the authors' fairseq code does, so
the two may coincide); the model runs twice, pass i sending every token of layer l to expert e_i of that layer (no
router, weight 1). The loss is

    L = 1/2 (CE(p_1, y) + CE(p_2, y)) + alpha * 1/2 (KL(p_1 || p_2) + KL(p_2 || p_1))

on the two passes' *output distributions* p_1, p_2 (`thor_loss`, `symmetric_kl`): every expert learns from the
data and from the other expert as a teacher (the authors' code sums the two CE terms where moekit averages them, a
rescaling of alpha). At inference each token gets one expert drawn at random (`random`, the code's token level) or
the average of all (`mean`, the expert ensemble). moekit's older `random` router is a one-pass, per-token
variant that regularises the two expert outputs by their squared difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.catalog._util import drop_weight
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing
from moekit.errors import ConfigError


@dataclass
class ThorOptions(RouterOptions):
    """inference: 'random' (one expert drawn per token) or 'mean' (every expert averaged). pair: 'distinct' or
    'independent' draws of the two passes' experts."""

    inference: str = "random"
    pair: str = "distinct"


@register_router("thor")
class ThorRouter(Router):
    """One expert of the drawn pair for every token of the batch in training (`ThorOptions`); no parameters."""

    Options = ThorOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if num_experts < 2:
            raise ConfigError(f"router 'thor': num_experts={num_experts}; expected at least 2 (a pair is drawn)")
        if self.options.inference not in ("random", "mean"):
            raise ConfigError(f"router_options.inference={self.options.inference!r}: expected 'random' or 'mean'")
        if self.options.pair not in ("distinct", "independent"):
            raise ConfigError(f"router_options.pair={self.options.pair!r}: expected 'distinct' or 'independent'")
        drop_weight(self)
        self.register_buffer("pair", torch.tensor([0, 1]), persistent=False)
        self.active = 0

    def draw_pair(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw the pair (distinct: uniform over the E (E - 1) ordered pairs; independent: over all E^2); pass 0
        uses the first."""
        first = int(torch.randint(self.num_experts, (), generator=generator))
        if self.options.pair == "independent":
            second = int(torch.randint(self.num_experts, (), generator=generator))
        else:
            second = (first + int(torch.randint(1, self.num_experts, (), generator=generator))) % self.num_experts
        self.pair = torch.tensor([first, second], device=self.pair.device)
        self.active = 0
        return self.pair

    def use(self, member: int) -> None:
        if member not in (0, 1):
            raise ConfigError(f"member={member!r}: expected 0 or 1 (the pair's first or second expert)")
        self.active = member

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        self.check_input(hidden, k)
        num_tokens, device = hidden.shape[0], hidden.device
        logits = torch.zeros(num_tokens, self.num_experts, device=device)
        probs = torch.full_like(logits, 1.0 / self.num_experts)
        if self.training:
            indices = self.pair[self.active].to(device).expand(num_tokens, 1)
            return Routing(logits, torch.ones(num_tokens, 1, device=device), indices, probs=probs)
        if self.options.inference == "mean":
            indices = torch.arange(self.num_experts, device=device).expand(num_tokens, self.num_experts)
        else:
            indices = torch.randint(self.num_experts, (num_tokens, 1), device=device)
        width = indices.shape[1]
        return Routing(logits, torch.full((num_tokens, width), 1.0 / width, device=device), indices, probs=probs)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None


def symmetric_kl(logits_1: Tensor, logits_2: Tensor) -> Tensor:
    """1/2 (KL(p_1 || p_2) + KL(p_2 || p_1)) with p_i = softmax(logits_i) over the last axis, mean over rows."""
    lp1 = F.log_softmax(logits_1.float() if logits_1.dtype != torch.float64 else logits_1, -1)
    lp2 = F.log_softmax(logits_2.float() if logits_2.dtype != torch.float64 else logits_2, -1)
    kl12 = (lp1.exp() * (lp1 - lp2)).sum(-1)
    kl21 = (lp2.exp() * (lp2 - lp1)).sum(-1)
    return (0.5 * (kl12 + kl21)).mean()


def thor_routers(model: nn.Module) -> list[ThorRouter]:
    return [m for m in model.modules() if isinstance(m, ThorRouter)]


def thor_loss(model: nn.Module, forward: Callable[[], Tensor], labels: Tensor, alpha: float = 1.0,
              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One THOR step: draw each layer's pair, run `forward()` (-> logits [..., C]) once per member, and return
    1/2 (CE_1 + CE_2) + alpha * symmetric KL, with its parts."""
    if not alpha >= 0:
        raise ConfigError(f"alpha={alpha!r}: expected a non-negative number")
    routers = thor_routers(model)
    if not routers:
        raise ConfigError("thor_loss: the model has no layer with router='thor'")
    for r in routers:
        r.draw_pair(generator)
    outs = []
    for member in (0, 1):
        for r in routers:
            r.use(member)
        outs.append(forward())
    ce = [F.cross_entropy(o.reshape(-1, o.shape[-1]).float(), labels.reshape(-1)) for o in outs]
    kl = symmetric_kl(outs[0].reshape(-1, outs[0].shape[-1]), outs[1].reshape(-1, outs[1].shape[-1]))
    ce_mean = (ce[0] + ce[1]) / 2
    return ce_mean + alpha * kl, {"ce": ce_mean, "consistency": kl}
