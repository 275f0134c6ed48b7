"""UNCURL (Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific Expert Pruning, Sarkar et
al. 2024): task-specific, offline reduction of each layer's E experts to E' = E - round(ratio E) by clustering and
merging, not by dropping (the paper shows dropping the least used experts hurts task accuracy).

The mechanism as the paper's summary states it (per-layer spectral clustering on router logits, permutation
alignment, activation-weighted merging; the full text is not in the seed notes, the details below are moekit's):

1. Router logits on the task's calibration tokens only (`task`: the documents of that domain; else all tokens):
   L [T, E]. Expert e is described by its column L[:, e], how the router scores it across the task.
2. Affinity A_ij = max(0, cos(L[:, i], L[:, j])) (A_ii = 1), and spectral clustering into E' clusters
   (`sklearn.cluster.SpectralClustering(affinity="precomputed")`, seeded, labels by discretization).
3. Per cluster, the most used expert on the task's tokens leads; every member's neurons are permuted to line up
   with the leader's (Hungarian matching on each neuron's gate row, up row and down column, as M-SMoE does); the
   merged expert is the average of the aligned members weighted by their routing counts on the task's tokens
   (their activation frequency: uniform if none was used).
4. The router keeps one row per cluster, fitted on the task's tokens so its logit is the members' log-sum-exp
   (`merge.fit_router_rows`), so a cluster receives the routing mass its members had.

`moekit compress --method frequency --task D` stays as the pruning variant (drop the least used experts on D).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from moekit.compress.calibrate import LayerStats, Stats
from moekit.compress.merge import align, fit_router_rows, merge_aligned, write_groups
from moekit.compress.plan import Plan
from moekit.compress.prune import drop_count
from moekit.compress.weights import read_experts
from moekit.hf.view import view


def logit_affinity(logits: Tensor) -> Tensor:
    """[E, E] max(0, cosine) of the router-logit columns of logits [T, E], with ones on the diagonal."""
    logits = logits.detach().double()
    cols = logits / logits.norm(dim=0, keepdim=True).clamp(min=1e-12)
    a = (cols.t() @ cols).clamp(min=0.0)
    a.fill_diagonal_(1.0)
    return a


def spectral_groups(affinity: Tensor, count: int, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of a precomputed affinity [E, E] into `count` clusters (sorted lists of experts)."""
    from sklearn.cluster import SpectralClustering

    n = affinity.shape[0]
    if count >= n:
        return [[e] for e in range(n)]
    if count == 1:
        return [list(range(n))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected": a disconnected expert is its own cluster
        labels = SpectralClustering(n_clusters=count, affinity="precomputed", assign_labels="discretize",
                                    random_state=seed).fit_predict(affinity.numpy())
    clusters = [sorted(int(e) for e in range(n) if labels[e] == c) for c in sorted(set(labels.tolist()))]
    while len(clusters) < count:  # an empty label: split the largest cluster's last member off
        big = max(clusters, key=len)
        clusters.append([big.pop()])
    return sorted(clusters)


def task_stats(s: LayerStats, domain: int | None) -> LayerStats:
    """The layer's statistics on the task's tokens only (all of them without a task)."""
    if domain is None:
        return s
    m = s.domain == domain
    return LayerStats(s.layer, s.x[m], None if s.grad is None else s.grad[m], s.logits[m], s.weights[m],
                      s.indices[m], s.domain[m])


def plan_uncurl(model: nn.Module, stats: Stats, ratio: float, task: str | None = None,
                protect: dict[int, list[int]] | None = None, seed: int = 0) -> Plan:
    """UNCURL's plan (module docstring). `protect` ({layer: experts}) stay clusters of their own."""
    domain = stats.domain_index(task) if task is not None else None
    protected = protect or {}
    layers = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        guard = sorted(set(protected.get(block.layer, [])))
        count = block.num_experts - drop_count(block.num_experts, ratio)
        s = task_stats(s, domain)
        logits, counts = s.logits, s.counts()
        free = [e for e in range(block.num_experts) if e not in guard]
        parts = spectral_groups(logit_affinity(logits[:, free]), max(1, count - len(guard)), seed) if free else []
        clusters = [[free[i] for i in c] for c in parts] + [[a] for a in guard]
        groups = sorted((sorted(c, key=lambda e: (-float(counts[e]), e)) for c in clusters), key=lambda g: g[0])
        w = read_experts(block)
        perms = [[align(w.neurons(g[0]), w.neurons(m)) for m in g] for g in groups]
        weights = []
        for g in groups:
            f = counts[g]
            total = float(f.sum())
            weights.append([1.0 / len(g)] * len(g) if total == 0 else [float(v) / total for v in f])
        rows, bias = fit_router_rows(block, s, groups)
        entry = {"keep": [g[0] for g in groups], "groups": groups, "perms": perms, "weights": weights,
                 "router": rows.tolist()}
        if bias is not None:
            entry["router_bias"] = bias.tolist()
        layers[block.layer] = entry
    return Plan("uncurl", ratio, layers, {"task": task, "protected": protected, "seed": seed})


def apply_uncurl(model: nn.Module, plan: Plan) -> None:
    for block in view(model):
        entry = plan.layers.get(block.layer)
        if entry is None:
            continue
        w = read_experts(block)
        merged = [merge_aligned(w, members, entry["weights"][g], entry["perms"][g])
                  for g, members in enumerate(entry["groups"])]
        write_groups(block, entry, merged)
