"""Expert pruning: drop whole experts (and their router rows) per layer.

Scores (higher = keep):
- `frequency`: how often the router picks the expert on the calibration tokens (with `task`, on that domain's
  tokens only: the task-specific pruning UNCURL compares against; UNCURL itself merges, `compress/uncurl.py`);
- `tcess`: PreMoe's task-conditioned expected selection score, the mean over the task's tokens of the router's
  probability for the expert where the expert is in the token's top-k (0 elsewhere);
- `reconstruct` (Lu et al. / NAEE): the drop set that changes the block's output least on the calibration tokens,
  ||block(x) - pruned_block(x)||^2 with the pruned block routing among the experts left; exhaustive over drop sets
  when there are at most `MAX_EXHAUSTIVE`, else greedy (one expert at a time).
`protect` ({layer: experts}, e.g. `moekit.compress.protect.find_super_experts`) keeps those experts whatever their
score.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import LayerStats, Stats
from moekit.compress.plan import Plan
from moekit.compress.weights import read_experts, write_block, write_router
from moekit.errors import ConfigError
from moekit.hf.view import BlockView, view

MAX_EXHAUSTIVE = 128


def drop_count(num_experts: int, ratio: float) -> int:
    """Experts removed from a layer of `num_experts` at `ratio` (at least 1, at least one left)."""
    return min(max(1, round(ratio * num_experts)), num_experts - 1)


def tcess(s: LayerStats, domain: int | None = None) -> Tensor:
    """[E] mean over the (domain's) tokens of softmax(logits)_e where e is in the token's top-k, else 0."""
    probs = torch.softmax(s.logits, dim=-1)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, s.indices, True)
    scores = probs * selected
    if domain is not None:
        scores = scores[s.domain == domain]
    return scores.mean(dim=0) if len(scores) else torch.zeros(s.num_experts)


def _keep_top(scores: Tensor, drop: int, protected: set[int]) -> list[int]:
    scores = scores.clone().float()
    for e in protected:
        scores[e] = math.inf
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return sorted(order[: len(scores) - drop])


def replace_module(block: BlockView, module: nn.Module):
    """The block's experts view over another module (write_router sets expert counts there)."""
    experts = copy.copy(block.experts)
    experts.module = module
    return experts


def prune_block(block: BlockView, keep: list[int]) -> None:
    """Keep only the listed experts and their router rows (in place)."""
    params = block.router_params()
    idx = torch.tensor(keep, dtype=torch.long)
    bias, corr = params.get("bias"), params.get("e_score_correction_bias")
    write_block(block, read_experts(block).select(keep), params["weight"].detach()[idx],
                None if bias is None else bias.detach()[idx], None if corr is None else corr[idx])


@torch.no_grad()
def _reconstruct_keep(block: BlockView, x: Tensor, drop: int, protected: set[int]) -> list[int]:
    experts = block.num_experts
    xd = x.to(block.experts.gate_up_proj.dtype)
    outputs = torch.stack([block.experts.expert(xd, e).float() for e in range(experts)])  # [E, T, H]
    params = block.router_params()

    def routed(keep: list[int]) -> Tensor:
        """The routed experts' output [T, H] when only `keep` is left (the shared expert cancels out)."""
        router = copy.deepcopy(block.router)
        alone = replace(block, block=router, router=router, experts=replace_module(block, router))
        idx = torch.tensor(keep, dtype=torch.long)
        bias, corr = params.get("bias"), params.get("e_score_correction_bias")
        write_router(alone, params["weight"].detach()[idx], None if bias is None else bias.detach()[idx],
                     None if corr is None else corr[idx])
        _, weights, indices = router(xd)
        chosen = outputs[idx[indices], torch.arange(len(x))[:, None]]  # [T, k, H]
        return (weights.float()[..., None] * chosen).sum(dim=1)

    full = routed(list(range(experts)))

    def error(keep: list[int]) -> float:
        return float((routed(keep) - full).pow(2).sum())

    candidates = [e for e in range(experts) if e not in protected]
    if drop > len(candidates):
        raise ConfigError(f"layer {block.layer}: cannot drop {drop} experts with {len(protected)} of {experts} "
                          f"protected; expected a smaller ratio")
    if math.comb(len(candidates), drop) <= MAX_EXHAUSTIVE:
        drops = itertools.combinations(candidates, drop)
        best = min(drops, key=lambda d: (error([e for e in range(experts) if e not in d]), d))
        return [e for e in range(experts) if e not in best]
    keep = list(range(experts))
    for _ in range(drop):
        options = [e for e in keep if e not in protected]
        worst = min(options, key=lambda e: (error([k for k in keep if k != e]), e))
        keep.remove(worst)
    return keep


def plan_prune(model: nn.Module, stats: Stats, method: str, ratio: float, task: str | None = None,
               protect: dict[int, list[int]] | None = None, max_tokens: int = 1024) -> Plan:
    """A pruning plan (`frequency`, `tcess` or `reconstruct`) removing `ratio` of each layer's experts."""
    domain = stats.domain_index(task) if task is not None else None
    layers = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        drop = drop_count(block.num_experts, ratio)
        guard = set((protect or {}).get(block.layer, []))
        if method == "frequency":
            scores = s.counts(domain)
            keep = _keep_top(scores, drop, guard)
        elif method == "tcess":
            scores = tcess(s, domain)
            keep = _keep_top(scores, drop, guard)
        elif method == "reconstruct":
            keep = _reconstruct_keep(block, s.x[:max_tokens], drop, guard)
            scores = s.counts(domain)
        else:
            raise ConfigError(f"method={method!r}: expected frequency, tcess or reconstruct")
        layers[block.layer] = {"keep": keep, "scores": [round(float(v), 6) for v in scores],
                               "protected": sorted(guard)}
    return Plan(method, ratio, layers, {"task": task, "protected": protect or {}})


def apply_prune(model: nn.Module, plan: Plan) -> None:
    for block in view(model):
        if block.layer in plan.layers:
            prune_block(block, plan.layers[block.layer]["keep"])
