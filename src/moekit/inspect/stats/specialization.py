"""What the routing depends on: the token id (OpenMoE's context-independent specialisation), the document's domain
or task (per-domain load, a normalised mutual information, PreMoe's TCESS)."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.inspect.trace import Trace


def _real(trace: Trace, i: int) -> tuple[Tensor, Tensor]:
    """(row [M], expert [M]): the token row and expert id of every real assignment at layer i."""
    idx, mask = trace.indices(i), trace.mask(i)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    if mask is None:
        return rows.reshape(-1), idx.reshape(-1)
    return rows[mask], idx[mask]


def _entropy(p: Tensor) -> Tensor:
    """Entropy (nats) along the last dimension of non-negative weights normalised to sum to 1."""
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)


def _joint(groups: Tensor, experts: Tensor, num_groups: int, num_experts: int) -> Tensor:
    """[G, E] float64 counts of assignments per (group, expert)."""
    return torch.bincount(groups * num_experts + experts, minlength=num_groups * num_experts
                          ).view(num_groups, num_experts).double()


def _conditional_score(joint: Tensor) -> float:
    """1 - H(E | G) / H(E) of a [G, E] count table: 1 when the group fixes the expert, 0 when it tells nothing."""
    total = joint.sum()
    h_e = float(_entropy(joint.sum(dim=0)))
    if total == 0 or h_e == 0:
        return 0.0
    weight = joint.sum(dim=1) / total
    h_cond = float((weight * _entropy(joint)).sum())
    return max(0.0, 1.0 - h_cond / h_e)


def _token_joint(trace: Trace, i: int, token_ids: Tensor, min_count: int) -> Tensor:
    """[U, E] assignment counts per (token id, expert), ids seen fewer than `min_count` times left out."""
    rows, experts = _real(trace, i)
    uniq, inverse, occurrences = torch.unique(token_ids, return_inverse=True, return_counts=True)
    frequent = occurrences[inverse[rows]] >= min_count
    return _joint(inverse[rows][frequent], experts[frequent], uniq.numel(), trace.num_experts[i])


def token_specialization(trace: Trace, i: int, min_count: int = 5) -> float:
    """How much of the routing the token id alone explains, 0..1: 1 - H(expert | token id) / H(expert) over the
    assignments of token ids seen at least `min_count` times (rarer ids would look perfectly specialised by chance).
    Compare with `token_specialization_baseline`, the same measure with token ids shuffled."""
    if min_count < 1:
        raise ConfigError(f"min_count={min_count}: expected a positive integer")
    return _conditional_score(_token_joint(trace, i, trace.token_ids, min_count))


def token_specialization_baseline(trace: Trace, i: int, min_count: int = 5, seed: int = 0) -> float:
    """`token_specialization` with the token ids randomly permuted over positions: what finite counts alone give."""
    ids = trace.token_ids
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))
    return _conditional_score(_token_joint(trace, i, ids[perm], min_count))


def top_tokens(trace: Trace, i: int, n: int = 5, min_count: int = 5) -> list[list[dict]]:
    """Per expert, the `n` token ids (seen at least `min_count` times) most often routed to it, each with `count`
    (assignments to the expert) and `share` (fraction of the id's occurrences that went to the expert)."""
    rows, experts = _real(trace, i)
    ids = trace.token_ids
    uniq, inverse, occurrences = torch.unique(ids, return_inverse=True, return_counts=True)
    joint = _joint(inverse[rows], experts, uniq.numel(), trace.num_experts[i])  # [U, E]
    joint[occurrences < min_count] = 0
    out = []
    for e in range(trace.num_experts[i]):
        c, u = joint[:, e].topk(min(n, uniq.numel()))
        out.append([{"token_id": int(uniq[j]), "count": int(v), "share": float(v / occurrences[j])}
                    for v, j in zip(c, u, strict=True) if v > 0])
    return out


def _domain_joint(trace: Trace, i: int, domain_ids: Tensor | None = None) -> Tensor:
    rows, experts = _real(trace, i)
    dom = (trace.domain_ids if domain_ids is None else domain_ids)[rows]
    labelled = dom >= 0
    return _joint(dom[labelled], experts[labelled], max(len(trace.domain_names), 1), trace.num_experts[i])


def domain_share(trace: Trace, i: int) -> dict[str, list[float]]:
    """domain -> [E]: the fraction of that domain's routed assignments each expert received (the load within the
    domain; each list sums to 1). Empty when the documents carry no labels."""
    joint = _domain_joint(trace, i)
    share = joint / joint.sum(dim=1, keepdim=True).clamp_min(1)
    return {name: share[d].tolist() for d, name in enumerate(trace.domain_names)}


def _mutual_information_ratio(joint: Tensor) -> float:
    """I(E; D) / H(D) of a [D, E] count table."""
    joint = joint.t()  # [E, D]: the expert is the condition here
    total = joint.sum()
    h_d = float(_entropy(joint.sum(dim=0)))
    if total == 0 or h_d == 0:
        return 0.0
    h_cond = float(((joint.sum(dim=1) / total) * _entropy(joint)).sum())
    return max(0.0, 1.0 - h_cond / h_d)


def domain_specialization(trace: Trace, i: int) -> float:
    """I(expert; domain) / H(domain) over the labelled assignments, 0..1: 1 when an expert's identity tells the
    domain for certain (domains routed to disjoint experts), 0 when every domain spreads over experts alike."""
    return _mutual_information_ratio(_domain_joint(trace, i))


def domain_specialization_baseline(trace: Trace, i: int, seed: int = 0) -> float:
    """`domain_specialization` with the documents' labels shuffled among the documents (same domain sizes in
    documents): what document-to-document variation alone gives."""
    doc = trace.doc
    labels = torch.full((int(doc.max()) + 1,), -1, dtype=torch.long)
    labels[doc] = trace.domain_ids
    seen = torch.unique(doc)
    perm = seen[torch.randperm(seen.numel(), generator=torch.Generator().manual_seed(seed))]
    shuffled = labels.clone()
    shuffled[seen] = labels[perm]
    return _mutual_information_ratio(_domain_joint(trace, i, shuffled[doc]))


def tcess(trace: Trace, i: int, domain: str | None = None) -> Tensor:
    """[E] float64: PreMoe's task-conditioned expected selection score of each expert for `domain` (None: every
    token): the mean over the domain's tokens of the router probability p_e the token gave expert e when e was among
    its chosen experts (0 otherwise). Unlike the load it weighs a confident choice above a marginal one."""
    rows = torch.arange(trace.num_tokens)
    if domain is not None:
        if domain not in trace.domain_names:
            raise ConfigError(f"domain={domain!r}: expected one of {trace.domain_names} (the trace's labels)")
        rows = rows[trace.domain_ids == trace.domain_names.index(domain)]
    idx, p = trace.indices(i)[rows], trace.probs_topk(i)[rows].double()
    mask = trace.mask(i)
    if mask is not None:
        p = p * mask[rows]
    score = torch.zeros(trace.num_experts[i], dtype=torch.float64).index_add_(0, idx.reshape(-1), p.reshape(-1))
    return score / max(rows.numel(), 1)
