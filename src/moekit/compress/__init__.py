"""Compress an MoE model of any supported family: prune, merge or shrink experts.

Every method is two steps: `plan(model, stats, method, ratio) -> Plan` (plain data, saved as plan.json) and
`apply(model, plan)`, which changes the model in memory (pass a copy to keep the original) and returns it. `stats`
comes from `calibrate(model, windows)` on calibration tokens. Methods: `frequency`, `tcess`, `reconstruct`
(expert pruning), `heapr` (atomic-expert pruning), `msmoe`, `submoe`, `dern`, `uncurl` (merging).
"""

from __future__ import annotations

from torch import nn

from moekit.compress.calibrate import CalibrationWarning, LayerStats, Stats, calibrate, token_windows
from moekit.compress.dern import apply_dern, plan_dern
from moekit.compress.heapr import apply_heapr, plan_heapr
from moekit.compress.merge import apply_merge, plan_msmoe, plan_submoe
from moekit.compress.plan import Plan, PlanError
from moekit.compress.protect import find_super_experts
from moekit.compress.prune import apply_prune, plan_prune
from moekit.compress.uncurl import apply_uncurl, plan_uncurl
from moekit.compress.weights import sync_config
from moekit.errors import ConfigError, UnknownNameError
from moekit.hf.view import view

METHODS = {
    "frequency": "drop the least routed experts (with task: on that domain's tokens; the pruning variant of UNCURL)",
    "tcess": "drop the experts with the lowest task-conditioned expected selection score (PreMoe)",
    "reconstruct": "drop the experts whose removal changes each block's output least (NAEE)",
    "heapr": "drop atomic experts (neurons) by HEAPr's output-space second-order score, ranked globally",
    "msmoe": "merge experts into the most used ones by router-logit similarity, neurons aligned (M-SMoE)",
    "submoe": "merge experts clustered by output similarity in a shared SVD subspace (Sub-MoE)",
    "dern": "drop the least used experts and recombine their neurons into the kept ones (DERN)",
    "uncurl": "merge experts spectrally clustered by their router logits on the task's tokens, neurons aligned, "
              "weighted by task routing counts (UNCURL; --task D: domain D's tokens)",
}
NEEDS_GRADS = {"heapr"}


def check_ratio(ratio: float, source: str = "ratio") -> float:
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"{source}={ratio}: expected a fraction strictly between 0 and 1")
    return ratio


def plan(model: nn.Module, stats: Stats, method: str, ratio: float, task: str | None = None,
         protect: dict[int, list[int]] | None = None) -> Plan:
    """What `method` would do to `model` at `ratio` (fraction of each layer's experts removed; for heapr the
    fraction of all atomic experts), from calibration `stats`. `protect` ({layer: experts}, e.g. the super experts
    `find_super_experts` confirms) are never dropped or merged away (heapr: keep every neuron)."""
    check_ratio(ratio)
    if method not in METHODS:
        raise UnknownNameError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if task is not None and method not in ("frequency", "tcess", "reconstruct", "uncurl"):
        raise ConfigError(f"task={task!r}: only frequency, tcess, reconstruct and uncurl use a task; not {method}")
    if method in ("frequency", "tcess", "reconstruct"):
        return plan_prune(model, stats, method, ratio, task, protect)
    if method == "heapr":
        return plan_heapr(model, stats, ratio, protect)
    if method == "dern":
        return plan_dern(model, stats, ratio, protect)
    if method == "uncurl":
        return plan_uncurl(model, stats, ratio, task, protect)
    return (plan_msmoe if method == "msmoe" else plan_submoe)(model, stats, ratio, protect)


def apply(model: nn.Module, p: Plan) -> nn.Module:
    """Carry out plan `p` on `model` (in place) and return it; the config follows where the layers allow."""
    blocks = {b.layer: b for b in view(model)}
    for layer, entry in p.layers.items():
        if layer not in blocks:
            raise PlanError(f"plan layer {layer}: the model has no MoE block there; expected one of {sorted(blocks)}")
        if max(entry["keep"], default=-1) >= blocks[layer].num_experts:
            raise PlanError(f"plan layer {layer}: keeps expert {max(entry['keep'])} of a layer with "
                            f"{blocks[layer].num_experts}; expected the plan of this model")
    if p.method in ("frequency", "tcess", "reconstruct"):
        apply_prune(model, p)
    elif p.method == "heapr":
        apply_heapr(model, p)
    elif p.method == "dern":
        apply_dern(model, p)
    elif p.method == "uncurl":
        apply_uncurl(model, p)
    elif p.method in ("msmoe", "submoe"):
        apply_merge(model, p)
    else:
        raise PlanError(f"plan method {p.method!r}: expected one of {', '.join(METHODS)}")
    sync_config(model, view(model))
    return model


__all__ = ["METHODS", "CalibrationWarning", "LayerStats", "Plan", "PlanError", "Stats", "apply", "calibrate",
           "check_ratio", "find_super_experts", "plan", "token_windows"]
