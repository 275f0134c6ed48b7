"""Statistics that need the experts' activations, so the model and data rather than a trace: super experts
("Unveiling Super Experts": rare, extreme outliers at the output of an expert's down_proj, confirmed by ablation)
and expert health (HoME: near-zero activations inside each expert, how much the shared expert carries per task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit.core.experts import ExpertsLike, linear
from moekit.core.routing import Routing
from moekit.data import TextDoc, Window, context_length
from moekit.errors import ConfigError
from moekit.inspect.layers import MoELayer, body, expert_input_hooks, find_layers
from moekit.inspect.trace import batch_numbers, resolve_data, select_windows


@dataclass
class ExpertActivations:
    """Per traced layer and expert: max_abs, the largest |value| at the output of down_proj (before the routing
    weight); tokens, how many tokens the expert processed; near_zero, the fraction of its intermediate activations
    (act(gate) * up) whose magnitude is below `zero_tol` times the RMS of all the layer's intermediate activations
    in the same forward. shared_share: domain -> per layer, the mean over tokens of |shared expert contribution| /
    (|shared| + |routed output|) (empty without shared experts)."""

    layers: list[int]
    max_abs: list[list[float]]
    tokens: list[list[int]]
    near_zero: list[list[float]]
    shared_share: dict[str, list[float | None]]


def _expert_parts(experts: ExpertsLike, x: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """Expert e on x [n, H]: its intermediate activation [n, I] and its down_proj output [n, H]."""
    up_bias = None if experts.gate_up_proj_bias is None else experts.gate_up_proj_bias[e]
    down_bias = None if experts.down_proj_bias is None else experts.down_proj_bias[e]
    h = experts.act(linear(x, experts.up_weight(e), up_bias))
    return h, linear(h, experts.down_weight(e), down_bias)


def _batches(wins: list[Window]) -> list[list[Window]]:
    return [[wins[n] for n in b] for b in batch_numbers(wins)]


def _windows(model: nn.Module, docs, tokenizer, seq_len, max_tokens) -> list[Window]:
    docs, tokenizer = resolve_data(model, docs, tokenizer)
    return select_windows(tokenizer, docs, seq_len or context_length(model), max_tokens)


class _SharedProbe:
    """Forward hooks measuring, per token, the shared expert's share of a layer's output norm."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.parts: dict[tuple[int, str], Tensor] = {}
        self.handles = []
        for i, ly in enumerate(layers):
            if ly.shared is None:
                continue
            self._hook(ly.shared, i, "shared")
            if ly.shared_gate is not None:
                self._hook(ly.shared_gate, i, "gate")
            self._hook(ly.routed if ly.is_moekit else ly.experts_module, i, "routed")

    def _hook(self, module: nn.Module, i: int, name: str) -> None:
        def hook(_m, _inputs, output):
            out = output.hidden if name == "routed" and hasattr(output, "hidden") else output
            self.parts[(i, name)] = out.detach().float().reshape(-1, out.shape[-1])
        self.handles.append(module.register_forward_hook(hook))

    def shares(self, i: int) -> Tensor | None:
        """[T] shared / (shared + routed) output norms of the last forward at layer i, or None."""
        if (i, "shared") not in self.parts:
            return None
        shared = self.parts[(i, "shared")]
        if (i, "gate") in self.parts:
            shared = torch.sigmoid(self.parts[(i, "gate")]) * shared
        routed = self.parts[(i, "routed")]
        if self.layers[i].is_moekit:  # the MoE output holds routed + shared
            routed = routed - shared
        s, r = shared.norm(dim=-1), routed.norm(dim=-1)
        return s / (s + r).clamp_min(1e-30)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def expert_activations(model: nn.Module, docs: Sequence[TextDoc] | None = None, tokenizer=None, *,
                       seq_len: int | None = None, max_tokens: int | None = 4096, zero_tol: float = 0.01,
                       progress: bool = True) -> ExpertActivations:
    """One pass over the data recording every expert's activations (see ExpertActivations). Each expert is run
    again on the tokens routed to it, so the numbers do not depend on how the model dispatches."""
    layers = find_layers(model)
    wins = _windows(model, docs, tokenizer, seq_len, max_tokens)
    L = len(layers)
    max_abs = [[0.0] * ly.num_experts for ly in layers]
    tokens = [[0] * ly.num_experts for ly in layers]
    zeros = [[0] * ly.num_experts for ly in layers]
    names = list(dict.fromkeys(w.domain for w in wins if w.domain is not None))
    share_sum = torch.zeros(len(names), L, dtype=torch.float64)
    share_n = torch.zeros(len(names), L, dtype=torch.float64)

    def record(i: int, hidden: Tensor, routing: Routing) -> None:
        experts = layers[i].experts
        chosen = F.one_hot(routing.indices.long(), layers[i].num_experts)  # [T, k, E]
        if routing.mask is not None:
            chosen = chosen * routing.mask[..., None]
        used = chosen.sum(dim=1) > 0  # [T, E]
        acts = {}
        for e in torch.nonzero(used.any(dim=0)).flatten().tolist():
            h, y = _expert_parts(experts, hidden[used[:, e]], e)
            max_abs[i][e] = max(max_abs[i][e], float(y.abs().max()))
            tokens[i][e] += h.shape[0]
            acts[e] = h.float().abs()
        # near zero: below zero_tol times the RMS of every intermediate activation of the layer in this forward
        rms = torch.cat([a.reshape(-1) for a in acts.values()]).pow(2).mean().sqrt()
        for e, a in acts.items():
            zeros[i][e] += int((a < zero_tol * rms).sum())

    probe = _SharedProbe(layers)
    runner = body(model)
    device = next(model.parameters()).device
    try:
        with expert_input_hooks(layers, record):
            for batch in tqdm(_batches(wins), desc="activations", unit="batch", disable=not progress):
                runner(torch.stack([w.ids for w in batch]).to(device))
                dom = torch.tensor([names.index(w.domain) if w.domain in names else -1 for w in batch]
                                   ).repeat_interleave(len(batch[0].ids))
                for i in range(L):
                    s = probe.shares(i)
                    if s is None:
                        continue
                    keep = dom >= 0
                    share_sum[:, i].index_add_(0, dom[keep], s.double().cpu()[keep])
                    share_n[:, i].index_add_(0, dom[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    finally:
        probe.remove()
    widths = [ly.experts.intermediate_size for ly in layers]
    near_zero = [[zeros[i][e] / max(tokens[i][e] * widths[i], 1) for e in range(layers[i].num_experts)]
                 for i in range(L)]
    has_shared = [ly.shared is not None for ly in layers]
    shared_share = {} if not any(has_shared) else {
        name: [float(share_sum[d, i] / share_n[d, i]) if has_shared[i] and share_n[d, i] > 0 else None
               for i in range(L)] for d, name in enumerate(names)}
    return ExpertActivations([ly.layer for ly in layers], max_abs, tokens, near_zero, shared_share)


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ids [B, L] under `model` (its output's `.logits`, or the output itself)."""
    out = model(ids)
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[list[Window]], loss_fn: Callable[[nn.Module, Tensor], Tensor]
               ) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        ids = torch.stack([w.ids for w in batch]).to(device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss_fn(model, ids)) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def ablation_loss_deltas(model: nn.Module, experts: list[tuple[int, int]], docs: Sequence[TextDoc] | None = None,
                         tokenizer=None, *, seq_len: int | None = None, max_tokens: int | None = 2048,
                         loss_fn: Callable[[nn.Module, Tensor], Tensor] = lm_loss) -> tuple[float, list[float]]:
    """The model's loss on the data, and for each (traced layer i, expert e) in `experts` how much it rises when
    that expert alone is removed (its down_proj, and bias, zeroed: it contributes nothing). The weights are
    restored afterwards."""
    layers = find_layers(model)
    batches = [b for b in _batches(_windows(model, docs, tokenizer, seq_len, max_tokens)) if len(b[0].ids) > 1]
    if not batches:
        raise ConfigError("docs: no window of at least 2 tokens; expected text to measure a loss on")
    base = _mean_loss(model, batches, loss_fn)
    deltas = []
    for i, e in experts:
        ex = layers[i].experts
        params = [p for p in (ex.down_proj, ex.down_proj_bias) if p is not None]
        saved = [p[e].clone() for p in params]
        try:
            for p in params:
                p[e].zero_()
            deltas.append(_mean_loss(model, batches, loss_fn) - base)
        finally:
            for p, s in zip(params, saved, strict=True):
                p[e].copy_(s)
    return base, deltas


def outlier_ranking(acts: ExpertActivations) -> list[tuple[int, int, float, float]]:
    """Every (traced layer i, expert e, max_abs, ratio to the median max_abs over the experts that processed
    tokens), largest first. Experts no token reached have max_abs 0 and do not count in the median: where most
    experts are unused, a median over all of them would be 0 and make every used expert an outlier."""
    used = [v for row, counts in zip(acts.max_abs, acts.tokens, strict=True)
            for v, n in zip(row, counts, strict=True) if n > 0]
    median = float(torch.tensor(used, dtype=torch.float64).median()) if used else 0.0
    ranked = [(i, e, v, v / median if median > 0 else 0.0) for i, row in enumerate(acts.max_abs)
              for e, v in enumerate(row)]
    return sorted(ranked, key=lambda r: -r[2])


def describe_outliers(model: nn.Module, candidates: list[tuple[int, int, float, float]], acts: ExpertActivations,
                      docs=None, tokenizer=None, **kw) -> list[dict]:
    """Entries {layer, expert, max_abs, ratio, ablation_loss_delta, ordinary_expert, ordinary_loss_delta} for the
    candidates: the loss change when the candidate is removed, against removing the expert of the same layer whose
    max_abs is the median over the layer's experts some token reached (an ordinary expert; an unused one would
    change nothing)."""
    ordinary = {}
    for i, _, _, _ in candidates:
        row = acts.max_abs[i]
        used = [e for e, n in enumerate(acts.tokens[i]) if n > 0] or list(range(len(row)))
        ordinary[i] = sorted(used, key=lambda e: row[e])[(len(used) - 1) // 2]
    pairs = [(i, e) for i, e, _, _ in candidates] + [(i, ordinary[i]) for i in dict.fromkeys(ordinary)]
    _, deltas = ablation_loss_deltas(model, pairs, docs, tokenizer, **kw)
    by_pair = dict(zip(pairs, deltas, strict=True))
    return [{"layer": acts.layers[i], "expert": e, "max_abs": v, "ratio": r, "ablation_loss_delta": by_pair[(i, e)],
             "ordinary_expert": ordinary[i], "ordinary_loss_delta": by_pair[(i, ordinary[i])]}
            for i, e, v, r in candidates]


def super_experts(model: nn.Module, docs: Sequence[TextDoc] | None = None, tokenizer=None, *, factor: float = 5.0,
                  activations: ExpertActivations | None = None, max_tokens: int | None = 4096,
                  ablation_tokens: int | None = 2048, seq_len: int | None = None, progress: bool = True,
                  loss_fn: Callable[[nn.Module, Tensor], Tensor] = lm_loss) -> list[dict]:
    """Super experts: experts whose largest |down_proj output| is at least `factor` times the median of that
    maximum over all experts of the model, each confirmed by ablation (`describe_outliers`). `layer` is the model's
    layer index. Empty when no expert stands out."""
    if factor <= 1:
        raise ConfigError(f"factor={factor}: expected a ratio above 1")
    acts = activations or expert_activations(model, docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                                             progress=progress)
    flagged = [c for c in outlier_ranking(acts) if c[3] >= factor]
    if not flagged:
        return []
    return describe_outliers(model, flagged, acts, docs, tokenizer, seq_len=seq_len, max_tokens=ablation_tokens,
                             loss_fn=loss_fn)


def expert_health(model: nn.Module, docs: Sequence[TextDoc] | None = None, tokenizer=None, *,
                  activations: ExpertActivations | None = None, near_zero_alarm: float = 0.9, **kw) -> dict:
    """HoME's expert health: per layer the near-zero activation fraction of each expert, the experts above
    `near_zero_alarm` (collapsed), and the shared expert's share of the output per domain."""
    acts = activations or expert_activations(model, docs, tokenizer, **kw)
    return {"layers": acts.layers, "near_zero": acts.near_zero,
            "collapsed": [[e for e, z in enumerate(row) if z >= near_zero_alarm] for row in acts.near_zero],
            "shared_share": acts.shared_share}
