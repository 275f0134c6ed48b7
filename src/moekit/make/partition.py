"""Neuron partitions of a dense FFN into equal-size experts (MoEfication's first step).

A gated FFN y = W_down (act(W_gate x) * (W_up x)) is a sum over its I neurons, so any split of the neuron indices
into E sets S_1..S_E gives E experts whose outputs sum to the dense output exactly: expert e keeps rows S_e of
W_gate and W_up and columns S_e of W_down. What differs between partitions is which neurons go together, and so
how well a few experts per token stand in for all of them.

- `random_partition`: a seeded permutation cut into E equal parts (LLaMA-MoE's best split after continued training).
- `balanced_kmeans`: k-means on the L2-normalised input rows (W_gate rows, or W_up for an ungated FFN), then every
  neuron reassigned under equal cluster sizes by an optimal assignment to I/E copies of each centre
  (`scipy.optimize.linear_sum_assignment`, cost 1 - cosine), centres recomputed, repeated to a fixed point
  (MoEfication / EMoE's constrained k-means).
- `coactivation_partition`: neurons that fire together on calibration tokens go together: balanced k-means on each
  neuron's (normalised) activation pattern over the tokens instead of its weights.
Each returns `[E, I/E]` int64 neuron indices, each row sorted.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moekit.errors import ConfigError


def check_split(width: int, experts: int) -> int:
    """The expert width I/E; ConfigError unless E is a positive divisor of the FFN width."""
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ConfigError(f"experts={experts!r}: expected a positive integer")
    if width % experts:
        raise ConfigError(f"experts={experts}: expected a divisor of the FFN width {width} (equal-size experts)")
    return width // experts


def random_partition(width: int, experts: int, seed: int = 0) -> Tensor:
    size = check_split(width, experts)
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
    return perm.view(experts, size).sort(dim=1).values


def _balanced_assign(points: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Each point's cluster under exactly `size` points per cluster, minimising the total (1 - cosine)."""
    cost = 1.0 - points @ centres.T  # [I, E]
    rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
    labels = np.empty(points.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return labels


def balanced_kmeans(rows: Tensor, experts: int, seed: int = 0, iters: int = 10) -> Tensor:
    """Equal-size spherical k-means of `rows [I, D]` (one row per neuron) into `experts` clusters."""
    from sklearn.cluster import KMeans

    width = rows.shape[0]
    size = check_split(width, experts)
    points = torch.nn.functional.normalize(rows.detach().double(), dim=1).numpy()
    centres = KMeans(experts, n_init=3, random_state=seed).fit(points).cluster_centers_
    labels = None
    for _ in range(iters):
        centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        new = _balanced_assign(points, centres, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([points[labels == e].mean(0) for e in range(experts)])
    order = np.argsort(labels, kind="stable")
    return torch.from_numpy(order.reshape(experts, size)).sort(dim=1).values


def coactivation_partition(activations: Tensor, experts: int, seed: int = 0) -> Tensor:
    """`activations [N tokens, I]`: neurons whose (centred) activation patterns over the tokens align are grouped
    (balanced k-means on the patterns, one row per neuron)."""
    if activations.dim() != 2 or activations.shape[0] < 2:
        raise ConfigError(f"activations: expected [tokens >= 2, neurons]; got {tuple(activations.shape)}")
    patterns = activations.detach().double().t()
    patterns = patterns - patterns.mean(dim=1, keepdim=True)
    return balanced_kmeans(patterns, experts, seed)


PARTITIONS = ("random", "kmeans", "coactivation")


def partition_neurons(method: str, rows: Tensor, experts: int, seed: int = 0, acts: Tensor | None = None,
                      layer: int = 0) -> Tensor:
    """`[E, I/E]` neuron indices by `method` (one of PARTITIONS) from layer `layer`'s FFN input rows `[I, D]`, and for
    `coactivation` its activations `[N, I]` on calibration tokens (random: a different permutation per layer)."""
    if method == "random":
        return random_partition(rows.shape[0], experts, seed + layer)
    if method == "kmeans":
        return balanced_kmeans(rows, experts, seed)
    if method == "coactivation":
        if acts is None:
            raise ConfigError("partition=coactivation: needs the FFN's activations on calibration text (--data)")
        return coactivation_partition(acts, experts, seed)
    raise ConfigError(f"partition={method!r}: expected one of {', '.join(PARTITIONS)}")


def shared_neurons(count: int, acts: Tensor | None = None, weights: tuple[Tensor, Tensor, Tensor] | None = None,
                   domains: Tensor | None = None) -> Tensor:
    """The `count` neurons of a shared expert (DeepSeekMoE's always-on expert, chosen as Read-ME does: the neurons
    that carry the most activation mass). With calibration activations `acts [N, I]`: each neuron's mean |a| over
    the tokens; with `domains [N]` (a domain id per token) the smallest of its per-domain means, each domain's
    means divided by their average, so a neuron is kept only if every domain uses it. Without data, a weight proxy:
    |gate row| |up row| |down column| from `weights = (gate [I, H], up [I, H], down [H, I])`. Sorted indices [count]."""
    if acts is not None:
        mass = acts.detach().abs().double()
        if domains is None:
            score = mass.mean(0)
        else:
            per = torch.stack([mass[domains == d].mean(0) for d in torch.unique(domains)])  # [D, I]
            score = (per / per.mean(1, keepdim=True).clamp_min(1e-30)).min(0).values
    elif weights is not None:
        gate, up, down = (w.detach().double() for w in weights)
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    else:
        raise ConfigError("shared expert: expected calibration activations or the FFN's weights")
    if not 0 <= count <= score.numel():
        raise ConfigError(f"shared expert: {count} neurons; expected 0..{score.numel()}")
    return score.topk(count).indices.sort().values
