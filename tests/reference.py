"""Slow, obviously-correct reference implementations: one token at a time, plain Python loops and sorting.

Nothing here is shared with src/moekit: routing is re-derived from the formulas, experts are evaluated row by row
from the raw 3D weights, and capacity is applied by walking the assignments in priority order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _ranked(values: list[float]) -> list[int]:
    """Indices of `values`, largest first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    ex = [math.exp(v - m) for v in values]
    s = sum(ex)
    return [v / s for v in ex]


def ref_softmax_topk(logits: Tensor, k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    weights, indices = [], []
    for row in logits.double().tolist():
        p = _softmax(row)
        top = _ranked(p)[:k]
        w = [p[i] for i in top]
        if normalize:
            w = [v / sum(w) for v in w]
        weights.append(w)
        indices.append(top)
    return _pack(weights, indices, k)


def ref_topk_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    weights, indices = [], []
    for row in logits.double().tolist():
        top = _ranked(row)[:k]
        weights.append(_softmax([row[i] for i in top]))
        indices.append(top)
    return _pack(weights, indices, k)


def _allowed_groups(scores: list[float], n_group: int, topk_group: int, per_group_score) -> set[int]:
    size = len(scores) // n_group
    group_score = [per_group_score(sorted(scores[g * size:(g + 1) * size], reverse=True)) for g in range(n_group)]
    return set(_ranked(group_score)[:topk_group])


def ref_deepseek_v3(logits: Tensor, k: int, bias: Tensor, n_group: int, topk_group: int, normalize: bool,
                    scaling: float) -> tuple[Tensor, Tensor]:
    weights, indices = [], []
    size = logits.shape[1] // n_group
    for row in logits.double().tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        choice = [v + b for v, b in zip(s, bias.double().tolist(), strict=True)]
        groups = _allowed_groups(choice, n_group, topk_group, lambda g: sum(g[:2]))
        allowed = [i for i in range(len(s)) if i // size in groups]
        top = sorted(allowed, key=lambda i: (-choice[i], i))[:k]
        w = [s[i] for i in top]
        if normalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scaling for v in w])
        indices.append(top)
    return _pack(weights, indices, k)


def ref_deepseek_v2(logits: Tensor, k: int, method: str, n_group: int, topk_group: int,
                    scaling: float) -> tuple[Tensor, Tensor]:
    weights, indices = [], []
    size = logits.shape[1] // n_group
    for row in logits.double().tolist():
        p = _softmax(row)
        allowed = list(range(len(p)))
        if method == "group_limited_greedy":
            groups = _allowed_groups(p, n_group, topk_group, lambda g: g[0])
            allowed = [i for i in allowed if i // size in groups]
        top = sorted(allowed, key=lambda i: (-p[i], i))[:k]
        weights.append([p[i] * scaling for i in top])
        indices.append(top)
    return _pack(weights, indices, k)


def _pack(weights: list, indices: list, k: int) -> tuple[Tensor, Tensor]:
    return (torch.tensor(weights, dtype=torch.float64).reshape(-1, k),
            torch.tensor(indices, dtype=torch.int64).reshape(-1, k))


def _gelu(v: Tensor) -> Tensor:
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def ref_expert(x: Tensor, gate_up: Tensor, down: Tensor, kind: str, gate_up_bias: Tensor | None = None,
               down_bias: Tensor | None = None, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """One expert on one token x [H]; gate_up [2I or I, H] and down [H, I] in the [out, in] layout."""
    h = torch.stack([torch.dot(row, x) for row in gate_up])
    if gate_up_bias is not None:
        h = h + gate_up_bias
    if kind == "gelu":
        a = _gelu(h)
    else:
        half = h.shape[0] // 2
        if kind == "gpt_oss":
            gate, up = h[0::2], h[1::2]
        else:
            gate, up = h[:half], h[half:]
        if kind == "swiglu":
            a = gate / (1 + torch.exp(-gate)) * up
        elif kind == "geglu":
            a = _gelu(gate) * up
        else:
            gate = torch.clamp(gate, max=limit)
            up = torch.clamp(up, -limit, limit)
            a = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
    out = torch.stack([torch.dot(row, a) for row in down])
    return out if down_bias is None else out + down_bias


def ref_keep(indices: Tensor, capacity: int | None, mask: Tensor | None = None) -> Tensor:
    """[T, k] bool: which assignments survive capacity, walking first choices of all tokens before second ones."""
    num_tokens, k = indices.shape
    keep = torch.zeros(num_tokens, k, dtype=torch.bool)
    used: dict[int, int] = {}
    for j in range(k):
        for t in range(num_tokens):
            if mask is not None and not mask[t, j]:
                continue
            e = int(indices[t, j])
            if capacity is None or used.get(e, 0) < capacity:
                used[e] = used.get(e, 0) + 1
                keep[t, j] = True
    return keep


def ref_moe(x: Tensor, indices: Tensor, weights: Tensor, experts, capacity: int | None = None,
            mask: Tensor | None = None, shared=None) -> Tensor:
    """Per-token MoE output from a routing decision and a moekit `Experts` module's raw weights."""
    keep = ref_keep(indices, capacity, mask)
    dtype = torch.float64
    out = torch.zeros(x.shape[0], x.shape[1], dtype=dtype)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            if not keep[t, j]:
                continue
            e = int(indices[t, j])
            gu, dn = experts.gate_up_proj[e].double(), experts.down_proj[e].double()
            if experts.transposed:
                gu, dn = gu.t(), dn.t()
            gub = None if experts.gate_up_proj_bias is None else experts.gate_up_proj_bias[e].double()
            dnb = None if experts.down_proj_bias is None else experts.down_proj_bias[e].double()
            y = ref_expert(x[t].double(), gu, dn, experts.act.kind, gub, dnb, experts.act.alpha, experts.act.limit)
            out[t] += float(weights[t, j].detach()) * y
        if shared is not None:
            out[t] += ref_shared(x[t].double(), shared)
    return out


def ref_shared(x: Tensor, shared) -> Tensor:
    kind = shared.act.kind
    up = shared.up_proj.weight.double() @ x
    if shared.gate_proj is None:
        a = _gelu(up)
    else:
        gate = shared.gate_proj.weight.double() @ x
        gu = torch.cat([gate, up]) if kind != "gpt_oss" else torch.stack([gate, up], 1).reshape(-1)
        eye = torch.eye(gu.shape[0], dtype=torch.float64)
        return _gated_shared(x, shared, ref_expert(gu, eye, shared.down_proj.weight.double(), kind))
    return _gated_shared(x, shared, shared.down_proj.weight.double() @ a)


def _gated_shared(x: Tensor, shared, y: Tensor) -> Tensor:
    if shared.shared_expert_gate is None:
        return y
    g = float(shared.shared_expert_gate.weight.detach().double() @ x)
    return y / (1 + math.exp(-g))


def ref_top_p(logits: Tensor, p: float) -> list[dict[int, float]]:
    """Per token {expert: weight}: the fewest experts, best first, whose softmax mass reaches p; weights unchanged."""
    out = []
    for row in logits.double().tolist():
        probs = _softmax(row)
        chosen, mass = {}, 0.0
        for i in _ranked(probs):
            chosen[i] = probs[i]
            mass += probs[i]
            if mass >= p:
                break
        out.append(chosen)
    return out


def ref_null_experts(logits: Tensor, k: int, num_real: int) -> list[dict[int, float]]:
    """Per token {real expert: weight}: top-k over real + null experts, null ones dropped, the rest renormalised."""
    out = []
    for row in logits.double().tolist():
        probs = _softmax(row)
        real = [i for i in _ranked(probs)[:k] if i < num_real]
        total = sum(probs[i] for i in real)
        out.append({i: probs[i] / total for i in real})
    return out


def ref_expert_choice(logits: Tensor, capacity: int) -> list[dict[int, float]]:
    """Per token {expert: softmax prob}: every expert takes the `capacity` tokens with the highest probability."""
    probs = [_softmax(row) for row in logits.double().tolist()]
    out: list[dict[int, float]] = [{} for _ in probs]
    for e in range(len(probs[0]) if probs else 0):
        column = [row[e] for row in probs]
        for t in _ranked(column)[:capacity]:
            out[t][e] = probs[t][e]
    return out



def ref_attention_experts(x: Tensor, indices: Tensor, weights: Tensor, mask: Tensor | None, moa) -> Tensor:
    """Per token, per chosen expert, per head h of it, in float64 loops: q = W_q[e][h] x_t, scores over the allowed
    keys, softmax or stick-breaking weights walked from the nearest key back; y_t += w W_o[e] concat_h(sum_s a_s
    v_s). `moa` is a `MixtureOfAttention` (its raw weights and config are read)."""
    cfg = moa.config
    batch, seq, _ = x.shape
    xd = x.detach().double()
    q_w, k_w, v_w, o_w = (p.detach().double() for p in (moa.q_proj, moa.k_proj, moa.v_proj, moa.o_proj))
    out = torch.zeros(batch, seq, x.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for t in range(seq):
            n = b * seq + t
            for j in range(indices.shape[1]):
                if mask is not None and not mask[n, j]:
                    continue
                e = int(indices[n, j])
                kv = 0 if cfg.shared_kv else e
                d = moa.head_dim
                heads = []
                for h in range(cfg.heads_per_expert):
                    rows = slice(h * d, (h + 1) * d)
                    q = q_w[e][rows] @ xd[b, t]
                    keys = list(range(t + 1)) if cfg.causal else list(range(seq))
                    scores = [float(q @ (k_w[kv][rows] @ xd[b, s])) / math.sqrt(d) for s in keys]
                    if cfg.kind == "softmax":
                        a = _softmax(scores)
                    else:
                        a = [0.0] * len(keys)
                        remaining = 1.0
                        for i in reversed(range(len(keys))):  # nearest key first
                            beta = 1 / (1 + math.exp(-scores[i]))
                            a[i] = remaining * beta
                            remaining *= 1 - beta
                    heads.append(sum(a[i] * (v_w[kv][rows] @ xd[b, s]) for i, s in enumerate(keys)))
                out[b, t] += float(weights[n, j].detach()) * (o_w[e] @ torch.cat(heads))
    return out
