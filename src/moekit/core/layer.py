"""`MoE`: router + routed experts + shared experts + dispatch, returning the output and its losses explicitly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import torch
from torch import Tensor, nn

from moekit.core.dispatch import DISPATCH_IMPLS, capacity_for
from moekit.core.experts import Activation, SharedExperts
from moekit.core.losses import seq_balance_loss, switch_balance_loss, update_correction_bias, z_loss
from moekit.core.routers import Router, build_router
from moekit.core.routing import Routing, check_k
from moekit.core.step import Dispatcher
from moekit.errors import ConfigError, ShapeError


class MoEOutput:
    """hidden: same shape as the input. routing: over the flattened tokens. expert_counts: [E] assignments each
    expert processed. dropped: assignments dropped over capacity. losses: the unweighted auxiliary losses by name;
    aux_loss: their weighted sum (a scalar tensor). Both are computed on first access (decode steps that never read
    them do not pay for them) and stay differentiable."""

    def __init__(self, hidden: Tensor, routing: Routing, expert_counts: Tensor, dropped: int,
                 loss_fn: Callable[[], tuple[dict[str, Tensor], Tensor]]):
        self.hidden = hidden
        self.routing = routing
        self.expert_counts = expert_counts
        self.dropped = dropped
        self._loss_fn = loss_fn

    @cached_property
    def _computed_losses(self) -> tuple[dict[str, Tensor], Tensor]:
        return self._loss_fn()

    @property
    def losses(self) -> dict[str, Tensor]:
        return self._computed_losses[0]

    @property
    def aux_loss(self) -> Tensor:
        return self._computed_losses[1]

    def __repr__(self) -> str:
        return (f"MoEOutput(hidden={tuple(self.hidden.shape)}, experts={self.routing.num_experts}, k={self.routing.k}, "
                f"dropped={self.dropped})")


@dataclass
class LossWeights:
    """Coefficients of the auxiliary losses folded into `MoEOutput.aux_loss` (0 disables one)."""

    balance: float = 0.01
    z: float = 0.0
    seq: float = 0.0


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value


def aux_losses(routing: Routing, seq_len: int, w: LossWeights,
               router: Router | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """The unweighted auxiliary losses by name, and their sum weighted by `w` (the router's own losses with their
    own weights). The balance loss is the router's (`Router.balance_loss`; absent for fixed or balanced routing)."""
    balance = switch_balance_loss(routing) if router is None else router.balance_loss(routing)
    losses: dict[str, Tensor] = {"z": z_loss(routing.logits)}
    aux = w.z * losses["z"]
    if balance is not None:
        losses["balance"] = balance
        aux = aux + w.balance * balance
    if w.seq:
        losses["seq"] = seq_balance_loss(routing, max(seq_len, 1))
        aux = aux + w.seq * losses["seq"]
    for name, (loss, weight) in ({} if router is None else router.extra_losses(routing)).items():
        losses[name] = loss
        aux = aux + weight * loss
    return losses, aux


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer.

    hidden_size H, intermediate_size I (width of one routed expert), num_experts E, k experts per token.
    router: a registered router name (`moekit.core.routers.router_names()`), with `router_options`; research
    routers and expert kinds are in `moekit.core.catalog` (docs/routers.md).
    activation: swiglu | geglu | gelu | gpt_oss. num_shared_experts: experts every token uses, each of width
    `shared_intermediate_size` (default: the routed expert width), gated by a sigmoid if `shared_gate`.
    granularity m (DeepSeekMoE fine-grained segmentation): E*m experts of width I/m, k*m of them per token.
    capacity_factor: None for dropless dispatch, else Switch/GShard capacity with dropping.
    dispatch: "auto", "loop" (one GEMM per active expert) or "grouped_mm".
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        k: int = 2,
        router: str = "topk",
        activation: str = "swiglu",
        *,
        router_options: dict[str, Any] | None = None,
        num_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,
        shared_gate: bool = False,
        granularity: int = 1,
        capacity_factor: float | None = None,
        bias: bool = False,
        alpha: float = 1.702,
        limit: float = 7.0,
        loss_weights: LossWeights | None = None,
        dispatch: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("intermediate_size", intermediate_size)
        _positive_int("num_experts", num_experts)
        check_k(k, num_experts)
        _positive_int("granularity", granularity)
        if intermediate_size % granularity:
            raise ConfigError(f"granularity={granularity}: expected a divisor of intermediate_size={intermediate_size}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ConfigError(f"num_shared_experts={num_shared_experts!r}: expected a non-negative integer")
        if dispatch not in DISPATCH_IMPLS:
            raise ConfigError(f"dispatch={dispatch!r}: expected one of {', '.join(DISPATCH_IMPLS)}")
        for name, value in (("alpha", alpha), ("limit", limit), *([("capacity_factor", capacity_factor)]
                                                                  if capacity_factor is not None else [])):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r}: expected a finite number")
        if capacity_factor is not None:
            capacity_for(1, 1, 1, capacity_factor)  # validates the factor
        self.hidden_size = hidden_size
        self.num_experts = num_experts * granularity
        self.k = k * granularity
        self.granularity = granularity
        self.capacity_factor = capacity_factor
        self.dispatch_impl = dispatch
        self.loss_weights = loss_weights or LossWeights()
        act = Activation(activation, alpha, limit)
        self.router = build_router(router, hidden_size, self.num_experts, self.k, router_options)
        self.experts = self.router.make_experts(self.num_experts, hidden_size, intermediate_size // granularity, act,
                                                bias, dtype, device)
        self.shared_experts = None
        if num_shared_experts:
            width = shared_intermediate_size or intermediate_size // granularity
            self.shared_experts = SharedExperts(hidden_size, num_shared_experts * width, act, shared_gate,
                                                dtype=dtype, device=device)
        self.router.to(device=device, dtype=dtype)

    def forward(self, hidden: Tensor, k: int | None = None, *, token_ids: Tensor | None = None) -> MoEOutput:
        """hidden [..., H] -> MoEOutput. `k` overrides the number of experts per token for this call (for
        "self-slimmable" inference, Sparse MoE as the New Dropout). `token_ids` [...] (the input ids, one per
        token of `hidden`) is read by routers that route by token id (`hash`)."""
        if not isinstance(hidden, Tensor):
            raise ShapeError(f"hidden: a {type(hidden).__name__}; expected a tensor [..., {self.hidden_size}]")
        if hidden.dim() < 1 or hidden.shape[-1] != self.hidden_size:
            raise ShapeError(f"hidden: expected last dimension hidden_size={self.hidden_size}, "
                             f"got shape {list(hidden.shape)}")
        x = hidden.reshape(-1, self.hidden_size)
        if token_ids is not None:
            if token_ids.numel() != x.shape[0]:
                raise ShapeError(f"token_ids: expected one id per token ({x.shape[0]}), got shape "
                                 f"{list(token_ids.shape)}")
            token_ids = token_ids.reshape(-1)
        step = self.router.run(x, k, token_ids, Dispatcher(self.experts, self.capacity_factor, self.dispatch_impl))
        out = step.out
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        seq_len = hidden.shape[-2] if hidden.dim() >= 3 else x.shape[0]
        losses = partial(aux_losses, step.routing, seq_len, self.loss_weights, self.router)
        return MoEOutput(out.view(hidden.shape), step.routing, step.counts, step.dropped, losses)

    def set_step(self, step: int, total_steps: int) -> None:
        """Training progress, for routers with a schedule (SMoE-Dropout's k); a no-op for the others."""
        hook = getattr(self.router, "set_step", None)
        if hook is not None:
            hook(step, total_steps)

    def update_bias(self, expert_counts: Tensor, gamma: float = 1e-3) -> None:
        """Auxiliary-loss-free balancing step (router must have `e_score_correction_bias`, e.g. deepseek_v3)."""
        bias = getattr(self.router, "e_score_correction_bias", None)
        if bias is None:
            raise ConfigError(f"update_bias: router {self.router.name!r} has no e_score_correction_bias; "
                              "expected router='deepseek_v3'")
        update_correction_bias(bias, expert_counts, gamma)
