"""The research routers and expert kinds, one module per idea; importing this package registers them all.

Registry names: top_p, null_experts, expert_choice, hash, random, smoe_dropout, sinkhorn, recurrent, chain,
weak_strong, small_big_skip, film, thor, sparse_ot, moe_x (and topk from `moekit.core.routers`). docs/routers.md
compares them; docs/seeds.md lists every seed system.
"""

from moekit.core.catalog import (
    chain,
    expert_choice,
    film,
    fixed,
    moe_x,
    null_experts,
    random,
    recurrent,
    sinkhorn,
    small_big_skip,
    sparse_ot,
    thor,
    top_p,
    weak_strong,
)

__all__ = ["chain", "expert_choice", "film", "fixed", "moe_x", "null_experts", "random", "recurrent", "sinkhorn",
           "small_big_skip", "sparse_ot", "thor", "top_p", "weak_strong"]
