"""Cardinality-constrained optimal transport routing (Sparsity-Constrained Optimal Transport, Liu et al.).

Tokens are the sources (mass a_t = 1/T), experts the targets (mass b_e = 1/E), the cost is C = -logits. The plan

    min_P <P, C> + gamma/2 ||P||^2   s.t.  P 1 = a,  P^T 1 = b,  P >= 0,  ||P[:, e]||_0 <= c  for every e

sends each expert at most c tokens (c = ceil(capacity_factor T k / E)). It is found through the paper's semi-dual

    D(alpha) = <alpha, a> - sum_e phi_e(alpha),
    phi_e(alpha) = max_{p >= 0, 1^T p = b_e, ||p||_0 <= c} <p, alpha - C[:, e]> - gamma/2 ||p||^2,

whose maximiser p_e(alpha) is the projection of (alpha - C[:, e]) / gamma onto the b_e-simplex restricted to its c
largest entries (top-c, then a simplex projection: exact for the simplex). D is concave with gradient
a - sum_e p_e(alpha); moekit ascends it with Nesterov's accelerated gradient (step gamma / E). Any feasible plan P
has <P, C> + gamma/2 ||P||^2 >= D(alpha) (weak duality), so a plan that meets the marginals at the dual value is
optimal (`duality_gap` checks it). A token's experts are the nonzeros of its row, weighted by T P[t, e]
(differentiable in the logits through the projection; alpha is not differentiated); the layer's k enters only
through c, so a token gets as many experts as its row of the plan has nonzeros. Cardinality 1 recovers unregularised
OT, c >= T the quadratically regularised one. moekit's `sinkhorn` router is the entropic stand-in (S-BASE + cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.catalog._util import pack_chosen
from moekit.core.routers import Router, RouterOptions, register_router
from moekit.core.routing import Routing, widen
from moekit.errors import ConfigError


def project_simplex(v: Tensor, mass: Tensor | float, keep: Tensor | None = None) -> Tensor:
    """Euclidean projection of each column of v [m, n] onto {p >= 0, sum p = mass} among the rows where `keep`
    [m, n] is True (0 elsewhere). Sort-based (Held et al.)."""
    neg = torch.finfo(v.dtype).min / 4
    w = v if keep is None else torch.where(keep, v, torch.full_like(v, neg))
    u, _ = torch.sort(w, dim=0, descending=True)
    css = torch.cumsum(u, 0) - mass
    ranks = torch.arange(1, v.shape[0] + 1, device=v.device, dtype=v.dtype).unsqueeze(1)
    cond = (u - css / ranks > 0) & (u > neg / 2)
    rho = cond.to(v.dtype).cumsum(0).argmax(0, keepdim=True)  # last True (conditions hold on a prefix)
    theta = css.gather(0, rho) / (rho + 1).to(v.dtype)
    out = torch.clamp(v - theta, min=0)
    return out if keep is None else out * keep


def column_plan(alpha: Tensor, cost: Tensor, b: Tensor, cardinality: int, gamma: float) -> Tensor:
    """p_e(alpha) for every expert: [m, n], each column with at most `cardinality` nonzeros summing to b_e."""
    z = (alpha.unsqueeze(1) - cost) / gamma
    c = min(cardinality, z.shape[0])
    top = torch.topk(z.detach(), c, dim=0).indices
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(0, top, True)
    return project_simplex(z, b.unsqueeze(0), keep)


def semi_dual(alpha: Tensor, cost: Tensor, a: Tensor, b: Tensor, cardinality: int, gamma: float) -> Tensor:
    plan = column_plan(alpha, cost, b, cardinality, gamma)
    phi = (plan * (alpha.unsqueeze(1) - cost)).sum() - gamma / 2 * plan.square().sum()
    return (alpha * a).sum() - phi


@torch.no_grad()
def solve_semi_dual(cost: Tensor, a: Tensor, b: Tensor, cardinality: int, gamma: float,
                    iterations: int = 300) -> Tensor:
    """alpha [m] maximising the semi-dual by accelerated gradient ascent (step gamma / n, n = experts)."""
    m, n = cost.shape
    alpha = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    y, step = alpha.clone(), gamma / n
    for i in range(iterations):
        grad = a - column_plan(y, cost, b, cardinality, gamma).sum(1)
        new = y + step * grad
        y = new + (i / (i + 3)) * (new - alpha)
        alpha = new
    return alpha


def sparse_ot_plan(cost: Tensor, cardinality: int, gamma: float, iterations: int = 300,
                   a: Tensor | None = None, b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(plan [m, n], alpha [m]) for uniform marginals unless given; the plan is differentiable in `cost`."""
    m, n = cost.shape
    a = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device) if a is None else a
    b = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device) if b is None else b
    alpha = solve_semi_dual(cost.detach(), a, b, cardinality, gamma, iterations)
    return column_plan(alpha, cost, b, cardinality, gamma), alpha


def duality_gap(plan: Tensor, alpha: Tensor, cost: Tensor, a: Tensor, b: Tensor, cardinality: int,
                gamma: float) -> float:
    """primal(plan) - D(alpha) >= 0 for any feasible plan; 0 certifies optimality."""
    primal = (plan * cost).sum() + gamma / 2 * plan.square().sum()
    return float(primal - semi_dual(alpha, cost, a, b, cardinality, gamma))


@dataclass
class SparseOTOptions(RouterOptions):
    """capacity_factor: c = ceil(capacity_factor T k / E) tokens at most per expert. gamma: the quadratic
    regularisation (smaller: closer to unregularised OT, slower ascent). iterations: dual ascent steps. With
    capacity_factor 1 the cap equals the balanced share exactly, the nonconvex problem is at its tightest and the
    dual's plan can miss tokens' marginals (their weights then do not sum to 1); 1.25 leaves slack."""

    capacity_factor: float = 1.25
    gamma: float = 0.1
    iterations: int = 300


@register_router("sparse_ot")
class SparseOTRouter(Router):
    """Tokens to experts by cardinality-constrained OT (`SparseOTOptions`): at most c tokens per expert."""

    Options = SparseOTOptions

    def __init__(self, hidden_size: int, num_experts: int, k: int, options: dict | None = None):
        super().__init__(hidden_size, num_experts, k, options)
        o = self.options
        for name in ("capacity_factor", "gamma"):
            if not getattr(o, name) > 0:
                raise ConfigError(f"router_options.{name}={getattr(o, name)!r}: expected a positive number")
        if not isinstance(o.iterations, int) or o.iterations < 1:
            raise ConfigError(f"router_options.iterations={o.iterations!r}: expected a positive integer")

    def rule(self, logits: Tensor, k: int) -> Routing:
        num_tokens, num_experts = logits.shape
        probs = torch.softmax(widen(logits), dim=-1)
        if num_tokens == 0:
            empty = torch.zeros(0, 1, dtype=torch.long, device=logits.device)
            return Routing(logits, probs.new_zeros(0, 1), empty, mask=empty.bool(), probs=probs)
        capacity = math.ceil(self.options.capacity_factor * num_tokens * k / num_experts)
        cost = -widen(logits)
        cost = cost - cost.detach().mean()  # the plan is shift-invariant; keeps alpha near 0
        plan, _ = sparse_ot_plan(cost, capacity, self.options.gamma, self.options.iterations)
        scores = plan * num_tokens  # a token's weights sum to about 1
        indices, weights, mask = pack_chosen(plan.detach() > 0, scores)
        return Routing(logits, weights, indices, mask=mask, probs=probs)

    def balance_loss(self, routing: Routing) -> None:  # noqa: ARG002
        return None
