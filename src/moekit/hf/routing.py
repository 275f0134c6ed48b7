"""Each family's routing recomputed with moekit's pure rules from the router's own tensors.

`accelerate` keeps calling the family's router, so it needs none of this; `reference_routing` is what tools that
reason about routing without running transformers' module (inspection, compression, offloading) use, and its
tests pin down how each family routes. PhiMoE's sparsemixer has no rule in `moekit.core` and lives here (eval
mode only: in training it samples with Gumbel noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core.routing import Routing, sigmoid_group_topk, softmax_group_topk, softmax_topk, topk_softmax
from moekit.errors import ConfigError
from moekit.hf.view import BlockView


def sparsemixer_eval(logits: Tensor, jitter_eps: float) -> Routing:
    """PhiMoE's sparsemixer in eval mode, always top-2: slot 1 is the argmax e1, weighted by the softmax over the
    experts within a relative margin 2 * jitter_eps of it (|s_max - s_i| / max(|s_i|, s_max) <= 2 eps); slot 2
    is the argmax e2 with e1 removed, weighted the same way around e2 (e1 excluded)."""
    scores = logits.float()
    slots = []
    masked = scores
    for _ in range(2):
        top, idx = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        outside = (top - scores) / factor > 2 * jitter_eps
        weight = torch.softmax(masked.masked_fill(outside, float("-inf")), dim=-1).gather(-1, idx)
        slots.append((weight, idx))
        masked = torch.scatter(masked, -1, idx, float("-inf"))
    weights = torch.cat([w for w, _ in slots], dim=-1)
    indices = torch.cat([i for _, i in slots], dim=-1)
    return Routing(logits, weights, indices, probs=torch.softmax(scores, dim=-1))


def reference_routing(block: BlockView, hidden: Tensor) -> Routing:
    """Route hidden [T, H] as `block`'s family does, with moekit's rules (indices in descending-score order;
    transformers' DeepSeek routers return them unsorted)."""
    router, kind, k = block.router, block.family.routing, block.k
    params = block.router_params()
    if kind == "softmax_topk":
        logits = F.linear(hidden, params["weight"])
        return softmax_topk(logits, k, normalize=getattr(router, "norm_topk_prob", True))  # Mixtral always norms
    if kind == "softmax_group_topk":
        logits = F.linear(hidden.float(), params["weight"].float())
        return softmax_group_topk(logits, k, method=router.topk_method, n_group=router.num_group or 1,
                                  topk_group=router.topk_group or 1, normalize=False,
                                  scaling=router.routed_scaling_factor)
    if kind == "sigmoid_group_topk":
        logits = F.linear(hidden.float(), params["weight"].float())
        return sigmoid_group_topk(logits, k, correction_bias=params["e_score_correction_bias"],
                                  n_group=router.num_group, topk_group=router.topk_group,
                                  normalize=router.norm_topk_prob, scaling=router.routed_scaling_factor)
    if kind == "topk_softmax":
        logits = F.linear(hidden, params["weight"], params.get("bias"))
        return topk_softmax(logits, k)
    if kind == "sparsemixer":
        if router.training:
            raise ConfigError(f"layer {block.layer}: PhiMoE's sparsemixer samples in training mode; expected the "
                              f"model in eval mode for reference_routing")
        return sparsemixer_eval(F.linear(hidden, params["weight"]), router.router_jitter_noise)
    raise ConfigError(f"routing={kind!r}: expected a routing kind of moekit.hf.families.ROUTING_KINDS")
