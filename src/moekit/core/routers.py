"""Routers: modules that own the router parameters and apply one routing rule, and the name registry.

Every router is called the same way, `router(hidden [T, H], k=None, token_ids=None) -> Routing`, and is registered
under a name so that `MoE(router="topk", router_options={...})` and the research routers (`moekit.core.catalog`)
plug in alike. A router's options are its own small dataclass (`Router.Options`); unknown option names are refused
with the list of valid ones. Besides the rule, a router says which balance loss its layer uses (`balance_loss`),
adds its paper's own losses (`extra_losses`), and may run the whole routed part of the layer (`run`) when its idea
is an expert structure rather than a routing rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.experts import Activation, Experts
from moekit.core.losses import switch_balance_loss
from moekit.core.routing import (
    Routing,
    check_groups,
    check_k,
    sigmoid_group_topk,
    softmax_group_topk,
    softmax_topk,
    topk_softmax,
    widen,
)
from moekit.core.step import Dispatcher, Step
from moekit.errors import ConfigError, RoutingError, ShapeError, UnknownNameError

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a `Router` subclass constructible by `name`."""

    def add(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ConfigError(f"router name {name!r} is already registered by {ROUTERS[name].__name__}")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return add


def router_names() -> list[str]:
    return sorted(ROUTERS)


def build_router(
    name: str, hidden_size: int, num_experts: int, k: int, options: dict[str, Any] | None = None
) -> Router:
    """Construct the router registered as `name`."""
    if name not in ROUTERS:
        raise UnknownNameError(f"router={name!r}: expected one of {', '.join(router_names())}")
    return ROUTERS[name](hidden_size, num_experts, k, options)


@dataclass
class RouterOptions:
    """Options every router has. bias: a learned per-expert logit bias (GPT-OSS). jitter: in training, the router
    input is multiplied by uniform noise in [1 - jitter, 1 + jitter] (Switch Transformer); the experts see the clean
    input. logits_fp32: compute the logits in float32 whatever the input dtype (DeepSeek)."""

    bias: bool = False
    jitter: float = 0.0
    logits_fp32: bool = False


class Router(nn.Module):
    """Base router: `weight [E, H]` (+ optional `bias [E]`) produces logits; `rule` turns them into a `Routing`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[RouterOptions]] = RouterOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict[str, Any] | None = None):
        super().__init__()
        check_k(k, num_experts)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.k = k
        self.options = make_options(self.Options, options, f"router_options for router {self.name!r}")
        if self.options.jitter < 0 or self.options.jitter >= 1:
            raise ConfigError(f"router_options.jitter={self.options.jitter}: expected a value in [0, 1)")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if self.options.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """[T, H] -> [T, E]."""
        if self.training and self.options.jitter > 0:
            noise = torch.empty_like(hidden).uniform_(1.0 - self.options.jitter, 1.0 + self.options.jitter)
            hidden = hidden * noise
        weight, bias = self.weight, self.bias
        if self.options.logits_fp32:
            hidden, weight = widen(hidden), widen(weight)
            bias = None if bias is None else widen(bias)
        return F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))

    def rule(self, logits: Tensor, k: int) -> Routing:
        raise NotImplementedError

    def check_input(self, hidden: Tensor, k: int | None) -> int:
        """Validate hidden [T, H] and the per-call k; returns the k to use."""
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise ShapeError(f"router input: expected shape [T, {self.hidden_size}], got {list(hidden.shape)}")
        k = self.k if k is None else k
        check_k(k, self.num_experts)
        return k

    def forward(self, hidden: Tensor, k: int | None = None, token_ids: Tensor | None = None) -> Routing:  # noqa: ARG002
        """hidden [T, H] -> Routing. `token_ids` [T] is read by routers that route by token id (hash)."""
        k = self.check_input(hidden, k)
        return self.rule(self.checked_logits(hidden), k)

    def checked_logits(self, hidden: Tensor) -> Tensor:
        """`logits(hidden)`, refusing NaN with a message that says how many tokens have it."""
        logits = self.logits(hidden)
        if torch.isnan(logits).any():
            raise RoutingError(
                f"router {self.name!r}: logits contain NaN for "
                f"{int(torch.isnan(logits).any(-1).sum())} of {logits.shape[0]} tokens; expected finite values "
                "(check the layer input and router weight for NaN/inf)"
            )
        return logits

    def make_experts(self, num_experts: int, hidden_size: int, intermediate_size: int, act: Activation, bias: bool,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
        """The routed experts of this router's layer: E fused experts. FiLM-modulated experts override this;
        expert kinds with extra modules sized by the expert width (a weak or a small expert) build them here."""
        return Experts(num_experts, hidden_size, intermediate_size, act, bias, dtype=dtype, device=device)

    def run(self, x: Tensor, k: int | None, token_ids: Tensor | None, dispatcher: Dispatcher) -> Step:
        """The routed part of the layer on x [T, H]: route, then dispatch to the chosen experts."""
        return dispatcher(x, self(x, k, token_ids))

    def balance_loss(self, routing: Routing) -> Tensor | None:
        """The load-balancing loss of this router's layer (weighted by `LossWeights.balance`); None where the
        routing is fixed or balanced by construction, so no balance loss is trained."""
        return switch_balance_loss(routing)

    def extra_losses(self, routing: Routing) -> dict[str, tuple[Tensor, float]]:  # noqa: ARG002
        """The paper's own auxiliary losses: name -> (unweighted loss, its weight in `aux_loss`)."""
        return {}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, {self.options}"


def make_options(cls: type, given: dict[str, Any] | None, where: str) -> Any:
    """Build an options dataclass, refusing a non-dict, unknown names (with the list of known ones) and values of
    the wrong type (a string for a flag, NaN or infinity for a number)."""
    if given is not None and not isinstance(given, Mapping):
        raise ConfigError(f"{where}: {given!r}; expected a dict of option names to values")
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(map(str, unknown))}; expected some of {', '.join(sorted(fields))}"
        )
    for name, value in given.items():
        _check_option(str(fields[name].type), name, value, where)
    return cls(**given)


def _check_option(kind: str, name: str, value: Any, where: str) -> None:
    """Check `value` against an option's annotation (bool, int, float, str, optionally `| None`)."""
    if value is None and kind.endswith("| None"):
        return
    kind = kind.removesuffix(" | None")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = {"bool": isinstance(value, bool), "int": number and isinstance(value, int),
          "float": number and math.isfinite(value), "str": isinstance(value, str)}.get(kind, True)
    if not ok:
        expected = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string"}[kind]
        raise ConfigError(f"{where}: {name}={value!r}; expected {expected}")


@dataclass
class TopKOptions(RouterOptions):
    """normalize: divide the kept probabilities by their sum (Mixtral, Qwen3 `norm_topk_prob`)."""

    normalize: bool = True


@register_router("topk")
class TopKRouter(Router):
    """w = topk(softmax(x W^T)), renormalised over the k kept experts when `normalize`."""

    Options = TopKOptions

    def rule(self, logits: Tensor, k: int) -> Routing:
        return softmax_topk(logits, k, self.options.normalize)


@register_router("topk_softmax")
class TopKSoftmaxRouter(Router):
    """w = softmax(topk(x W^T + b)): softmax over the k kept logits only (GPT-OSS)."""

    def rule(self, logits: Tensor, k: int) -> Routing:
        return topk_softmax(logits, k)


@dataclass
class GroupOptions(RouterOptions):
    """DeepSeek-style options. n_group / topk_group: group-limited selection (only the best `topk_group` of
    `n_group` expert groups compete); scaling: `routed_scaling_factor`; normalize: renormalise the kept weights."""

    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    logits_fp32: bool = True


@dataclass
class DeepSeekV3Options(GroupOptions):
    """normalize: `norm_topk_prob`."""

    normalize: bool = True


@register_router("deepseek_v3")
class DeepSeekV3Router(Router):
    """Sigmoid scores, selection steered by `e_score_correction_bias` (auxiliary-loss-free balancing; update it with
    `moekit.core.losses.update_correction_bias`), group-limited top-k."""

    Options = DeepSeekV3Options

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict[str, Any] | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        check_groups(num_experts, self.options.n_group, self.options.topk_group, k)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def rule(self, logits: Tensor, k: int) -> Routing:
        o = self.options
        bias = self.e_score_correction_bias
        return sigmoid_group_topk(logits, k, bias, o.n_group, o.topk_group, o.normalize, o.scaling)


@dataclass
class DeepSeekV2Options(GroupOptions):
    """method: 'greedy' or 'group_limited_greedy' (groups ranked by their best expert)."""

    method: str = "greedy"
    normalize: bool = False


@register_router("deepseek_v2")
class DeepSeekV2Router(Router):
    """Softmax scores; greedy top-k or group-limited greedy (best groups by their best expert)."""

    Options = DeepSeekV2Options

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict[str, Any] | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        if self.options.method == "group_limited_greedy":
            check_groups(num_experts, self.options.n_group, self.options.topk_group, k)

    def rule(self, logits: Tensor, k: int) -> Routing:
        o = self.options
        return softmax_group_topk(logits, k, o.method, o.n_group, o.topk_group, o.normalize, o.scaling)
