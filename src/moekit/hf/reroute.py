"""Inference-time routing changes on a trained Hugging Face MoE model, explicit and reversible.

`reroute(model, k=None, top_p=None, skip_threshold=None)` changes how every MoE block routes: a different k, top-p
(the fewest experts whose probability mass reaches p; Harder Tasks Need More Experts), or dynamic skipping (a token
drops an expert whose weight over its top weight is below a threshold, one threshold per MoE block allowed).
`unroute(model)` gives the family's own routing back. The change is an instance `forward` on each router module
(as `moekit.hf.accelerate` swaps the experts' forward), so the experts, shared experts and the block's forward are
untouched, and `accelerate` can be on or off. `experts_per_token(model)` reports the experts each block used per
token since the change.

`scmoe_logits` is self-contrast decoding (SCMoE, Unchosen Experts Can Contribute Too): the next-token scores of the
same model under strong (its top-k) and weak (only the expert ranked `weak_rank`) activation, combined as
log p_strong - beta log p_weak over the tokens with p_strong >= alpha max p_strong (-inf elsewhere).

Rules: selection and weights follow the family's own rule (`moekit.hf.reference_routing` with the new k); where
the family renormalises its top-k weights (Mixtral, Qwen3 `norm_topk_prob`, GPT-OSS, DeepSeek-V3), a token that
keeps fewer experts has its kept weights rescaled to the same total, otherwise they are kept as they are. Dropped
slots are padded with weight 0 (the experts module still runs the padded slot's expert; the output is exact).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.routing import check_k
from moekit.errors import ConfigError
from moekit.hf.routing import reference_routing
from moekit.hf.view import BlockView, view


@dataclass(frozen=True)
class RouteChange:
    """What changes in one block. k: experts per token (None: the family's). top_p: keep the fewest of those whose
    probability mass reaches top_p. skip_threshold: drop an expert with weight / top weight < threshold.
    rank: keep only the expert ranked `rank` (1 = best), SCMoE's weak activation. renormalize: rescale the kept
    weights to the sum of the original ones (None: where the family renormalises its top-k)."""

    k: int | None = None
    top_p: float | None = None
    skip_threshold: float | None = None
    rank: int | None = None
    renormalize: bool | None = None


def _renormalises(block: BlockView) -> bool:
    kind = block.family.routing
    if kind == "topk_softmax":
        return True
    if kind in ("softmax_topk", "sigmoid_group_topk"):
        return bool(getattr(block.router, "norm_topk_prob", True))
    return False


def _max_k(block: BlockView) -> int:
    """The most experts the family's rule can select (group-limited families: the experts of the allowed groups)."""
    router = block.router
    n_group = getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1
    topk_group = getattr(router, "topk_group", None) or n_group
    limited = block.family.routing == "sigmoid_group_topk" or getattr(router, "topk_method", "") == \
        "group_limited_greedy"
    return topk_group * (block.num_experts // n_group) if limited and n_group > 1 else block.num_experts


def keep_slots(weights: Tensor, probs: Tensor, change: RouteChange) -> Tensor:
    """[T, k] bool: the slots a token keeps under `change`, from its weights [T, k] (best first) and the
    per-slot probabilities [T, k] that top-p accumulates. Slot 0 is always kept (under `rank`, only slot rank - 1)."""
    keep = torch.ones_like(weights, dtype=torch.bool)
    if change.rank is not None:
        keep[:] = False
        keep[:, change.rank - 1] = True
        return keep
    if change.top_p is not None:
        keep &= (torch.cumsum(probs, -1) - probs) < change.top_p
    if change.skip_threshold is not None:
        top = weights.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        keep &= weights.abs() / top >= change.skip_threshold
    keep[:, 0] = True
    return keep


def apply_change(block: BlockView, hidden: Tensor, own: tuple[Tensor, Tensor, Tensor],
                 change: RouteChange) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The block's routing under `change`: (logits, weights [T, k'], indices [T, k'], keep [T, k'] real slots)."""
    logits, weights, indices = own
    k = change.k
    if change.rank is not None:
        k = change.rank
    elif change.top_p is not None and k is None:
        k = _max_k(block)
    if change.top_p is not None or (k is not None and k != weights.shape[-1]):
        routing = reference_routing(dataclasses.replace(block, k=k or weights.shape[-1]),
                                    hidden.reshape(-1, hidden.shape[-1]))
        weights, indices = routing.weights.to(weights.dtype), routing.indices
        probs = routing.probs.gather(1, indices)
    else:
        probs = torch.zeros_like(weights, dtype=torch.float32)  # read by top-p only
    order = torch.argsort(weights.float(), dim=-1, descending=True, stable=True)
    weights, indices, probs = weights.gather(1, order), indices.gather(1, order), probs.gather(1, order)
    keep = keep_slots(weights.float(), probs, change)
    kept = weights * keep
    if _renormalises(block) if change.renormalize is None else change.renormalize:
        total = weights.float().sum(-1, keepdim=True)
        kept = (kept.float() * total / kept.float().sum(-1, keepdim=True).clamp_min(1e-30)).to(weights.dtype)
    width = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
    by_keep = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]  # kept slots first
    kept, indices, keep = kept.gather(1, by_keep), indices.gather(1, by_keep), keep.gather(1, by_keep)
    first = indices[:, :1].expand_as(indices)
    return logits, kept, torch.where(keep, indices, first), keep


class _Rerouter:
    """Stands in for `router.forward(hidden) -> (logits, weights, indices)`; counts the experts it keeps."""

    def __init__(self, block: BlockView, change: RouteChange):
        self.block = block
        self.change = change
        self.tokens = 0
        self.assignments = 0

    def __call__(self, hidden: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
        router = self.block.router
        own = type(router).forward(router, hidden, *args, **kwargs)
        logits, weights, indices, keep = apply_change(self.block, hidden, own, self.change)
        self.tokens += keep.shape[0]
        self.assignments += int(keep.sum())
        return logits, weights, indices


def _thresholds(skip_threshold: float | list[float] | None, blocks: list[BlockView]) -> list[float | None]:
    if skip_threshold is None or isinstance(skip_threshold, (int, float)):
        values = [skip_threshold] * len(blocks)
    else:
        values = list(skip_threshold)
        if len(values) != len(blocks):
            raise ConfigError(f"skip_threshold: expected one value per MoE block ({len(blocks)}), got {len(values)}")
    for v in values:
        if v is not None and not 0 <= v <= 1:
            raise ConfigError(f"skip_threshold={v}: expected a value in [0, 1]")
    return values


def _install(block: BlockView, change: RouteChange) -> None:
    current = block.router.__dict__.get("forward")
    if current is not None and not isinstance(current, _Rerouter):
        raise ConfigError(f"layer {block.layer}: {type(block.router).__name__}.forward is already replaced by "
                          "something other than moekit.hf.reroute; expected the family's own forward")
    block.router.forward = _Rerouter(block, change)


def reroute(model: nn.Module, k: int | None = None, top_p: float | None = None,
            skip_threshold: float | list[float] | None = None, renormalize: bool | None = None) -> nn.Module:
    """Change how every MoE block of `model` routes (in place; returns `model`; `unroute` undoes it). Calling it
    again replaces the previous change. skip_threshold: one value, or one per MoE block in `view(model)` order.
    renormalize: whether the weights a token keeps are rescaled to the sum of its original ones (None: as the
    family renormalises its top-k; False keeps each expert's own weight, which costs dynamic skipping less)."""
    blocks = view(model)
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: expected a value in (0, 1]")
    for block, threshold in zip(blocks, _thresholds(skip_threshold, blocks), strict=True):
        if k is not None:
            check_k(k, _max_k(block))
        if block.family.routing == "sparsemixer" and (k is not None or top_p is not None):
            raise ConfigError(f"layer {block.layer}: PhiMoE's sparsemixer always routes to 2 experts; expected only "
                              "skip_threshold for this family")
        _install(block, RouteChange(k=k, top_p=top_p, skip_threshold=threshold, renormalize=renormalize))
    return model


def unroute(model: nn.Module) -> nn.Module:
    """Undo `reroute`: every router runs its class's forward again. In place; returns `model`."""
    for block in view(model):
        if isinstance(block.router.__dict__.get("forward"), _Rerouter):
            del block.router.forward
    return model


def experts_per_token(model: nn.Module) -> list[float | None]:
    """Per MoE block (`view(model)` order): the mean experts per token since `reroute` (None where the block is not
    rerouted or has seen no tokens)."""
    out = []
    for block in view(model):
        r = block.router.__dict__.get("forward")
        out.append(r.assignments / r.tokens if isinstance(r, _Rerouter) and r.tokens else None)
    return out


@contextlib.contextmanager
def _routed(model: nn.Module, change: RouteChange | None) -> Iterator[None]:
    """Run with every block under `change` (None: as it is now), then put back whatever forward was there."""
    blocks = view(model)
    saved = [b.router.__dict__.get("forward") for b in blocks]
    try:
        if change is not None:
            for b in blocks:
                b.router.__dict__.pop("forward", None)
                _install(b, change)
        yield
    finally:
        for b, fwd in zip(blocks, saved, strict=True):
            b.router.__dict__.pop("forward", None)
            if fwd is not None:
                b.router.forward = fwd


@torch.no_grad()
def scmoe_logits(model: nn.Module, input_ids: Tensor, beta: float = 0.5, weak_rank: int = 2,
                 strong_k: int | None = None, alpha: float | None = 0.1,
                 attention_mask: Tensor | None = None) -> Tensor:
    """Self-contrast scores [B, S, V]: log_softmax(strong) - beta * log_softmax(weak), where strong is the model
    routing as it is (or with `strong_k` experts) and weak keeps only each token's expert ranked `weak_rank`
    (1 = top-1). With `alpha`, tokens whose strong probability is below alpha times the best are set to -inf."""
    if beta < 0:
        raise ConfigError(f"beta={beta}: expected a non-negative number")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ConfigError(f"alpha={alpha}: expected a value in [0, 1] or None")
    for block in view(model):
        check_k(weak_rank, _max_k(block), "weak_rank")
    strong_change = None if strong_k is None else RouteChange(k=strong_k)
    with _routed(model, strong_change):
        strong = torch.log_softmax(model(input_ids, attention_mask=attention_mask).logits.float(), -1)
    with _routed(model, RouteChange(rank=weak_rank)):
        weak = torch.log_softmax(model(input_ids, attention_mask=attention_mask).logits.float(), -1)
    scores = strong - beta * weak
    if alpha is not None:
        plausible = strong >= strong.amax(-1, keepdim=True) + torch.log(torch.tensor(max(alpha, 1e-30)))
        scores = scores.masked_fill(~plausible, float("-inf"))
    return scores


@torch.no_grad()
def scmoe_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, beta: float = 0.5, weak_rank: int = 2,
                   strong_k: int | None = None, alpha: float | None = 0.1) -> Tensor:
    """Greedy decoding by `scmoe_logits` (two full forwards per token, no cache): input_ids [B, S] -> [B, S + n]."""
    ids = input_ids
    for _ in range(max_new_tokens):
        scores = scmoe_logits(model, ids, beta, weak_rank, strong_k, alpha)[:, -1]
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
    return ids
