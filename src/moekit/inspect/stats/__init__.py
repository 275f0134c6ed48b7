"""Routing statistics, each a function of a `Trace` (and of the model and data where it needs activations)."""

from moekit.inspect.stats.activations import (
    ExpertActivations,
    ablation_loss_deltas,
    describe_outliers,
    expert_activations,
    expert_health,
    lm_loss,
    outlier_ranking,
    super_experts,
)
from moekit.inspect.stats.routing import (
    balance,
    coactivation,
    counts,
    dead_experts,
    entropy,
    load,
    mass_coverage,
    membership,
    position_effects,
    transitions,
)
from moekit.inspect.stats.specialization import (
    domain_share,
    domain_specialization,
    domain_specialization_baseline,
    tcess,
    token_specialization,
    token_specialization_baseline,
    top_tokens,
)

__all__ = [
    "ExpertActivations", "ablation_loss_deltas", "balance", "coactivation", "counts", "dead_experts",
    "describe_outliers", "domain_share", "domain_specialization", "domain_specialization_baseline",
    "entropy", "expert_activations", "expert_health",
    "lm_loss", "load", "mass_coverage", "membership", "outlier_ranking", "position_effects", "super_experts", "tcess",
    "token_specialization", "token_specialization_baseline", "top_tokens", "transitions",
]
