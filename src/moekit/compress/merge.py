"""Expert merging: each layer's experts fall into E' groups and each group becomes one expert.

- `msmoe` (M-SMoE, Merge Then Compress): the E' most frequently routed experts are dominant; every other expert
  joins the dominant expert whose router logits are most similar (cosine of the logit columns over the
  calibration tokens); members' neurons are permuted to line up with the dominant expert's (Hungarian matching,
  `scipy.optimize.linear_sum_assignment`, on each neuron's gate row, up row and down column); the group's expert is
  the routing-frequency weighted average of the aligned members.
- `submoe` (Sub-MoE): experts are grouped by K-means on their outputs (spherical K-means: the cosine similarity
  of each expert's output on the same calibration tokens, farthest-first initialisation from the most routed
  expert, Lloyd steps to a fixed point; `cluster="agglomerative"` keeps moekit's earlier average-linkage
  clustering). Per group the Experts Union Decomposition is a joint SVD of the members' concatenated weights,
  [W_1 ... W_n] = U S [V_1 ... V_n] (each W_i oriented [H, .]), the shared basis U [H, r] truncated to `rank`;
  the members' own coefficient matrices V_i are averaged with their routing frequencies f_i and the expert is rebuilt,
  W = U S sum_i f_i V_i (identical experts merge exactly). With the default rank (one expert's rank, capped at H)
  the subspace is all of the hidden space when H <= one expert's rank (moekit-tiny: H = 256, I = 384) and the
  merge is the frequency-weighted average; a smaller `rank` keeps only the directions the group shares, which
  drops the members' conflicting directions (tests: a group sharing a rank-2 part recovers it better than the
  plain average does).

The router keeps one row per group. A group's row is fitted so its logit matches the log-sum-exp of the members'
logits on the calibration tokens (least squares; with the router bias as intercept where there is one): under
softmax routing exp(logit) of the group is then the sum of its members' exp(logit), so the group receives about
the probability mass its members had, and the checkpoint keeps its family's native router (no remapping table).
A one-member group keeps its own row, and so does every group's dominant (first) member when the calibration has
fewer than 4 tokens per hidden dimension (the least-squares fit would overfit them: at 256 tokens for moekit-tiny's
H = 256 it doubled M-SMoE's perplexity).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from moekit.compress.calibrate import LayerStats, Stats
from moekit.compress.plan import Plan
from moekit.compress.prune import drop_count
from moekit.compress.weights import ExpertWeights, read_experts, write_block
from moekit.errors import ConfigError
from moekit.hf.view import BlockView, view


def merge_weights(stats: LayerStats, members: list[int]) -> list[float]:
    """Members' routing frequencies, normalised (uniform when none of them was ever selected)."""
    f = stats.counts()[members]
    total = float(f.sum())
    return [1.0 / len(members)] * len(members) if total == 0 else [float(v) / total for v in f]


def align(reference: Tensor, other: Tensor) -> list[int]:
    """perm such that other's neuron perm[j] matches reference's neuron j (features [I, D]; maximises the summed
    dot products)."""
    cost = -(reference @ other.t()).double().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = [0] * len(rows)
    for r, c in zip(rows, cols, strict=True):
        perm[r] = int(c)
    return perm


MIN_FIT_TOKENS = 4  # calibration tokens per hidden dimension below which the fit is not tried (it would overfit)


def fit_router_rows(block: BlockView, stats: LayerStats, groups: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    """One router row [H] per group (and a bias per group where the router has one): least squares fit of the
    members' log-sum-exp logit on the calibration inputs."""
    params = block.router_params()
    weight = params["weight"].detach().float()
    bias = params.get("bias")
    bias = None if bias is None else bias.detach().float()
    x = stats.x
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1) if bias is not None else x
    rows, biases = [], []
    for members in groups:
        if len(members) == 1 or len(x) < MIN_FIT_TOKENS * x.shape[1]:  # too few tokens: the dominant expert's row
            rows.append(weight[members[0]])
            if bias is not None:
                biases.append(bias[members[0]])
            continue
        target = torch.logsumexp(stats.logits[:, members], dim=1, keepdim=True)  # [T, 1]
        solution = torch.linalg.lstsq(design.double(), target.double()).solution.float()[:, 0]
        rows.append(solution[: x.shape[1]])
        if bias is not None:
            biases.append(solution[-1])
    return torch.stack(rows), (torch.stack(biases) if bias is not None else None)


def _router_entry(block: BlockView, stats: LayerStats, groups: list[list[int]]) -> dict:
    rows, bias = fit_router_rows(block, stats, groups)
    entry = {"router": rows.tolist()}
    if bias is not None:
        entry["router_bias"] = bias.tolist()
    return entry


def _dominants(stats: LayerStats, count: int, protected: set[int]) -> list[int]:
    f = stats.counts()
    order = sorted(range(len(f)), key=lambda e: (e not in protected, -float(f[e]), e))
    return sorted(order[:count])


def plan_msmoe(model: nn.Module, stats: Stats, ratio: float, protect: dict[int, list[int]] | None = None) -> Plan:
    protected = protect or {}
    layers = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        guard = set(protected.get(block.layer, []))
        keep = _dominants(s, block.num_experts - drop_count(block.num_experts, ratio), guard)
        cols = s.logits / s.logits.norm(dim=0, keepdim=True).clamp(min=1e-12)
        sim = cols.t() @ cols  # [E, E] cosine of router-logit columns
        groups = [[d] for d in keep]
        open_groups = [g for g, d in enumerate(keep) if d not in guard] or list(range(len(keep)))
        for e in range(block.num_experts):
            if e not in keep:  # a super expert is merged into by no one (unless every group is one)
                groups[max(open_groups, key=lambda g: (float(sim[e, keep[g]]), -g))].append(e)
        w = read_experts(block)
        perms = [[align(w.neurons(g[0]), w.neurons(m)) for m in g] for g in groups]
        layers[block.layer] = {"keep": keep, "groups": groups, "perms": perms,
                               "weights": [merge_weights(s, g) for g in groups], **_router_entry(block, s, groups)}
    return Plan("msmoe", ratio, layers, {"protected": protected})


def _cluster(sim: Tensor, count: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of a similarity matrix [E, E] into `count` clusters."""
    clusters = [[e] for e in range(sim.shape[0])]
    while len(clusters) > count:
        best, pair = -float("inf"), (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                score = float(sim[clusters[a]][:, clusters[b]].mean())
                if score > best:
                    best, pair = score, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return clusters


def spherical_kmeans(features: Tensor, count: int, first: int = 0, max_steps: int = 100) -> list[list[int]]:
    """K-means of the rows of `features` [n, D] under cosine similarity into `count` clusters (sorted lists of
    row indices). Deterministic: the first centre is row `first`, each next one the row least similar to every
    centre so far; then Lloyd steps (assign each row to its most similar centre, centre = normalised mean) until
    the assignment repeats. A cluster left empty takes the row least similar to its own centre."""
    x = features.double() / features.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = x.shape[0]
    count = max(1, min(count, n))
    centres = [first]
    while len(centres) < count:
        best = (x @ x[centres].t()).max(dim=1).values
        best[centres] = float("inf")
        centres.append(int(best.argmin()))
    c = x[centres]
    assign = None
    for _ in range(max_steps):
        new = (x @ c.t()).argmax(dim=1)
        for j in range(count):
            if not (new == j).any():
                own = (x * c[new]).sum(1)
                new[int(own.argmin())] = j
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        c = torch.stack([x[assign == j].mean(0) for j in range(count)])
        c = c / c.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return [sorted(int(i) for i in torch.nonzero(assign == j).flatten()) for j in range(count)]


@torch.no_grad()
def expert_outputs(block: BlockView, stats: LayerStats, max_tokens: int = 512) -> Tensor:
    """[E, T * H]: each expert's output on the same calibration tokens, flattened and normalised."""
    x = stats.x[:max_tokens].to(block.experts.gate_up_proj.dtype)
    outs = torch.stack([block.experts.expert(x, e).float().flatten() for e in range(block.num_experts)])
    return outs / outs.norm(dim=1, keepdim=True).clamp(min=1e-12)


def output_similarity(block: BlockView, stats: LayerStats, max_tokens: int = 512) -> Tensor:
    """[E, E] cosine similarity of the experts' outputs on the same calibration tokens (flattened [T * H])."""
    outs = expert_outputs(block, stats, max_tokens)
    return outs @ outs.t()


CLUSTERINGS = ("kmeans", "agglomerative")


def plan_submoe(model: nn.Module, stats: Stats, ratio: float, protect: dict[int, list[int]] | None = None,
                cluster: str = "kmeans", rank: int | None = None) -> Plan:
    """Sub-MoE's plan: groups by `cluster` (K-means, the paper's, or moekit's earlier agglomerative clustering)
    on the experts' outputs; `rank`: the shared subspace's dimension in the union decomposition (None: one
    expert's rank, capped at the hidden size)."""
    if cluster not in CLUSTERINGS:
        raise ConfigError(f"cluster={cluster!r}: expected one of {', '.join(CLUSTERINGS)}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank={rank!r}: expected a positive integer or None")
    protected = protect or {}
    layers = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        guard = sorted(set(protected.get(block.layer, [])))
        count = block.num_experts - drop_count(block.num_experts, ratio)
        f = s.counts()
        if cluster == "agglomerative":
            sim = output_similarity(block, s)
            for a in guard:  # a super expert joins no group
                sim[a, :] = sim[:, a] = -2.0
                sim[a, a] = 1.0
            clusters = _cluster(sim, count)
        else:  # a super expert is a group of its own; the others are clustered into what is left
            free = [e for e in range(block.num_experts) if e not in guard]
            outs = expert_outputs(block, s)[free]
            first = max(range(len(free)), key=lambda i: (float(f[free[i]]), -i)) if free else 0
            parts = spherical_kmeans(outs, max(1, count - len(guard)), first) if free else []
            clusters = [[free[i] for i in c] for c in parts] + [[a] for a in guard]
        groups = [sorted(c, key=lambda e: (-float(f[e]), e)) for c in clusters]
        groups.sort(key=lambda g: g[0])
        layers[block.layer] = {"keep": [g[0] for g in groups], "groups": groups, "rank": rank,
                               "weights": [merge_weights(s, g) for g in groups], **_router_entry(block, s, groups)}
    return Plan("submoe", ratio, layers, {"protected": protected, "cluster": cluster})


def _avg(tensors: list[Tensor | None], weights: list[float]) -> Tensor | None:
    if tensors[0] is None:
        return None
    return sum(w * t for w, t in zip(weights, tensors, strict=True))


def merge_aligned(w: ExpertWeights, members: list[int], weights: list[float], perms: list[list[int]]) -> tuple:
    """The weighted average of the members after permuting each one's neurons: (gate, up, down, biases...)."""
    parts = []
    for m, perm in zip(members, perms, strict=True):
        p = torch.tensor(perm, dtype=torch.long)
        parts.append((w.gate[m][p], w.up[m][p], w.down[m][:, p],
                      None if w.gate_bias is None else w.gate_bias[m][p],
                      None if w.up_bias is None else w.up_bias[m][p],
                      None if w.down_bias is None else w.down_bias[m]))
    return tuple(_avg([part[i] for part in parts], weights) for i in range(6))


def _top_basis(gram: Tensor, rank: int) -> Tensor:
    """The `rank` leading eigenvectors [H, rank] of a symmetric Gram matrix [H, H]."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, values.argsort(descending=True)[:rank]]


def subspace_merge(w: ExpertWeights, members: list[int], weights: list[float], rank: int | None = None) -> tuple:
    """Sub-MoE: a joint SVD of the members' concatenated weights gives a shared basis on the hidden-size side
    (the leading eigenvectors of the summed Gram matrix, the same subspace), truncated to `rank` (default: one
    expert's rank); each member's coefficients in it are averaged with `weights` and mapped back."""
    gate_up = [torch.cat([w.gate[m], w.up[m]], dim=0).double() for m in members]  # each [2I, H]
    hidden = gate_up[0].shape[1]
    basis = _top_basis(sum(t.t() @ t for t in gate_up), min(rank or 2 * w.width, hidden))  # [H, r]
    merged_up = (sum(f * (t @ basis) for f, t in zip(weights, gate_up, strict=True)) @ basis.t()).float()
    down = [w.down[m].double() for m in members]  # each [H, I]
    basis = _top_basis(sum(t @ t.t() for t in down), min(rank or w.width, hidden))  # [H, r]
    merged_down = (basis @ sum(f * (basis.t() @ t) for f, t in zip(weights, down, strict=True))).float()
    biases = [_avg([None if b is None else b[m] for m in members], weights)
              for b in (w.gate_bias, w.up_bias, w.down_bias)]
    return (merged_up[: w.width], merged_up[w.width:], merged_down, *biases)


def write_groups(block: BlockView, entry: dict, merged: list[tuple]) -> None:
    """Write the merged experts (one tuple of canonical tensors per group) and the plan's router rows."""
    stacked = [None if merged[0][i] is None else torch.stack([m[i] for m in merged]) for i in range(6)]
    params = block.router_params()
    corr = params.get("e_score_correction_bias")
    corr = None if corr is None else corr[torch.tensor(entry["keep"], dtype=torch.long)]
    bias = torch.tensor(entry["router_bias"]) if "router_bias" in entry else None
    write_block(block, ExpertWeights(*stacked), torch.tensor(entry["router"]), bias, corr)


def apply_merge(model: nn.Module, plan: Plan) -> None:
    for block in view(model):
        entry = plan.layers.get(block.layer)
        if entry is None:
            continue
        w = read_experts(block)
        merged = []
        for g, members in enumerate(entry["groups"]):
            if plan.method == "msmoe":
                merged.append(merge_aligned(w, members, entry["weights"][g], entry["perms"][g]))
            elif len(members) == 1:
                merged.append(tuple(None if t is None else t[members[0]] for t in w.tensors()))
            else:
                merged.append(subspace_merge(w, members, entry["weights"][g], entry.get("rank")))
        write_groups(block, entry, merged)
