"""`accelerate(model)` runs every MoE block's experts through moekit's dispatch; `restore(model)` undoes it.

Only the experts computation is swapped: the family's own router still runs (so its numerics, `output_router_logits`
recording and training-mode noise are untouched), and so do its shared experts and the block's own forward. The
swap is an instance attribute `forward` on each experts module, so `restore` deletes it and the class's forward
(transformers' `experts_implementation` dispatch) is back exactly. Nothing is patched at import.
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit.core.dispatch import DISPATCH_IMPLS, dispatch, plan_assignments
from moekit.errors import ConfigError
from moekit.hf.view import HFExperts, view


class _MoekitExpertsForward:
    """Stands in for `experts.forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`."""

    def __init__(self, experts: HFExperts, impl: str):
        self.experts = experts
        self.impl = impl

    def __call__(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # an assignment of weight exactly 0 (an expert skipped by `moekit.hf.reroute`) adds nothing: not computed,
        # unless its weight needs a gradient (d out / d w is the expert's output even at w = 0)
        skip = None if top_k_weights.requires_grad else top_k_weights != 0
        plan = plan_assignments(top_k_index, top_k_weights, self.experts.num_experts,
                                mask=None if skip is None or bool(skip.all()) else skip)
        return dispatch(hidden, plan, self.experts, self.impl)


def is_accelerated(model: nn.Module) -> bool:
    return any(isinstance(v.experts.module.__dict__.get("forward"), _MoekitExpertsForward) for v in view(model))


def accelerate(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Route every MoE block of `model` through moekit's dispatch (`impl`: auto, loop or grouped_mm). In place;
    returns `model`. Calling it again changes `impl`. Blocks whose experts are already moekit's own modules
    (compressed: `RaggedExperts`, quantized experts), which compute on their own, are left as they are."""
    if impl not in DISPATCH_IMPLS:
        raise ConfigError(f"impl={impl!r}: expected one of {', '.join(DISPATCH_IMPLS)}")
    for block in view(model):
        module = block.experts.module
        if not isinstance(getattr(module, "down_proj", None), nn.Parameter):
            continue  # not transformers' fused experts: a compressed layout with its own forward
        current = module.__dict__.get("forward")
        if current is not None and not isinstance(current, _MoekitExpertsForward):
            raise ConfigError(f"layer {block.layer}: {type(module).__name__}.forward is already replaced by "
                              f"something other than moekit; expected the family's own forward")
        module.forward = _MoekitExpertsForward(block.experts, impl)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: every experts module runs its class's forward again. In place; returns `model`."""
    for block in view(model):
        module = block.experts.module
        if isinstance(module.__dict__.get("forward"), _MoekitExpertsForward):
            del module.forward
    return model
