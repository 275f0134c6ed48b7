"""Routing statistics, each a function of a `Trace` (and of the model and data where it needs activations)."""

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
    tcess,
    token_specialization,
    token_specialization_baseline,
    top_tokens,
)

__all__ = ["balance", "coactivation", "counts", "dead_experts", "domain_share", "domain_specialization", "entropy",
           "load", "mass_coverage", "membership", "position_effects", "tcess", "token_specialization",
           "token_specialization_baseline", "top_tokens", "transitions"]
