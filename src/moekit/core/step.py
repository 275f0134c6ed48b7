"""One forward of a layer's routed part: what a router's `run` returns, and the dispatcher it runs experts with.

Plain routers produce a `Routing` and the `Dispatcher` runs the experts it names. Expert kinds that are more than a
routing rule (THOR's sampled pair, chain-of-experts, weak/strong, small/big/skip, FiLM) override `Router.run` and
call the same dispatcher (or their own experts) as their structure needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.dispatch import capacity_for, dispatch, plan_dispatch
from moekit.core.experts import ExpertsLike
from moekit.core.routing import Routing


@dataclass
class Step:
    """out: [T, H] routed output (before shared experts). routing: the decision reported in `MoEOutput`.
    counts: [E] assignments each expert processed. dropped: assignments over capacity."""

    out: Tensor
    routing: Routing
    counts: Tensor
    dropped: int = 0


@dataclass
class Dispatcher:
    """Runs `experts` on the tokens a `Routing` names: dropless, or with Switch capacity when `capacity_factor`."""

    experts: ExpertsLike
    capacity_factor: float | None = None
    impl: str = "auto"

    def __call__(self, x: Tensor, routing: Routing) -> Step:
        """x [T, H] -> the weighted sum of each token's experts."""
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_for(x.shape[0], routing.k, self.experts.num_experts, self.capacity_factor)
        plan = plan_dispatch(routing, self.experts.num_experts, capacity)
        out = dispatch(x, plan, self.experts, self.impl)
        return Step(out, routing, torch.tensor(plan.counts, device=x.device), plan.dropped)
