"""The MoE layer: routing, experts, dispatch, losses. Depends on torch only."""

from moekit.core import catalog  # registers the research routers
from moekit.core.dispatch import DispatchPlan, capacity_for, dispatch, plan_assignments, plan_dispatch
from moekit.core.experts import ACTIVATIONS, Activation, Experts, SharedExperts
from moekit.core.layer import LossWeights, MoE, MoEOutput
from moekit.core.losses import seq_balance_loss, switch_balance_loss, update_correction_bias, z_loss
from moekit.core.routers import ROUTERS, Router, RouterOptions, build_router, register_router, router_names
from moekit.core.routing import Routing, sigmoid_group_topk, softmax_group_topk, softmax_topk, topk_softmax
from moekit.core.stack import link_layers
from moekit.core.step import Dispatcher, Step

__all__ = [
    "ACTIVATIONS", "ROUTERS", "Activation", "DispatchPlan", "Dispatcher", "Experts", "LossWeights", "MoE", "MoEOutput",
    "Router", "RouterOptions", "Routing", "SharedExperts", "Step", "build_router", "capacity_for", "catalog",
    "dispatch", "link_layers", "plan_assignments", "plan_dispatch", "register_router", "router_names",
    "seq_balance_loss", "sigmoid_group_topk", "softmax_group_topk", "softmax_topk", "switch_balance_loss",
    "topk_softmax", "update_correction_bias", "z_loss",
]
