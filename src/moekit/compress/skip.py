"""Dynamic expert skipping at inference (NAEE's dynamic skipping, MC-MoE's online pruning): a token keeps its
highest-weight expert, and drops each other chosen expert j whose routing weight is under a per-layer fraction of
the top one, w_j < threshold_L * w_top.

`calibrate_skip(model, docs, tokenizer, target=0.5)` sets threshold_L to the target quantile of the ratios
w_j / w_top (j = the second and later experts) layer L sees on calibration text while the layers before it already
skip with theirs, so that fraction of them is skipped in every layer; `max_loss_increase=x` instead finds the
largest common target whose calibration loss rises by at most x nats per token. `apply_skip(model, thresholds)`
applies them with `moekit.hf.reroute` (reversible with `unroute`; it counts the experts per token). The kept
experts keep their own weights (NAEE's rule, `renormalize=False`, the default here): on moekit-tiny, skipping half
of the second experts costs 0.3% perplexity that way against 1.4% when the kept weights are rescaled to the
family's total (`renormalize=None`, what the family does with its top-k). A skipped slot keeps weight 0, so
quantized experts (`DispatchedQuantizedExperts`) do not compute it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.data import DataError, TextDoc, context_length, windows
from moekit.errors import ConfigError
from moekit.hf.reroute import experts_per_token as rerouted_experts_per_token
from moekit.hf.reroute import reroute, unroute
from moekit.hf.view import view

DEFAULT_TOKENS = 16_384
_SEQ = 512


def weight_ratios(weights: Tensor) -> Tensor:
    """weights [T, k] -> [T, k-1]: each token's second and later routing weights over its top one."""
    w = weights.detach().float().sort(dim=-1, descending=True).values
    return w[:, 1:] / w[:, :1].clamp_min(1e-30)


def quantile_threshold(ratios: Tensor, target: float) -> float:
    """The threshold under which a `target` fraction of `ratios` lies: midway between the sorted ratios either
    side of the cut (0 for target 0, above every ratio below 1 for target 1)."""
    r = ratios.reshape(-1).sort().values
    n = r.numel()
    m = round(target * n)
    if n == 0 or m == 0:
        return 0.0
    if m >= n:
        return min(1.0, float(r[-1]) * (1 + 1e-6) + 1e-12)
    return float(r[m - 1] + r[m]) / 2


def apply_skip(model: nn.Module, thresholds: Sequence[float], renormalize: bool | None = False) -> nn.Module:
    """Skip low-weight experts in every MoE layer of `model` (thresholds in `view(model)` order) through
    `moekit.hf.reroute`; `moekit.hf.reroute.unroute(model)` undoes it and `moekit.hf.reroute.experts_per_token(model)`
    counts the experts per token since. In place; returns `model`."""
    return reroute(model, skip_threshold=[min(float(t), 1.0) for t in thresholds], renormalize=renormalize)


SKIP_FILE = "skip.json"


def read_skip(directory: str | os.PathLike, num_layers: int) -> dict | None:
    """The skip.json `moekit compress --skip` wrote next to a checkpoint ({thresholds, renormalize, ...}), or None
    when there is none. Raises ConfigError naming the file for one that is not that."""
    path = Path(directory) / SKIP_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        thresholds = [float(t) for t in spec["thresholds"]]
        renormalize = spec.get("renormalize", None)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: expected JSON with 'thresholds' (one number per MoE layer) and 'renormalize'"
                          ) from None
    if len(thresholds) != num_layers or renormalize not in (True, False, None):
        raise ConfigError(f"{path}: {len(thresholds)} thresholds and renormalize={renormalize!r}; expected "
                          f"{num_layers} (one per MoE layer) and true, false or null")
    return {"thresholds": thresholds, "renormalize": renormalize}


def _windows(model: nn.Module, docs: Sequence[TextDoc], tokenizer, max_tokens: int) -> list[Tensor]:
    seq = min(_SEQ, context_length(model))
    ws = [w.ids for w in windows(tokenizer, docs, seq, max_tokens) if w.ids.numel() >= 2]
    if not ws:
        raise DataError("calibration data: no window of 2 or more tokens; expected text for skip calibration")
    return ws


@torch.no_grad()
def _ratios(model: nn.Module, ws: list[Tensor], layer: int, earlier: Sequence[float], renormalize: bool | None
            ) -> Tensor:
    """The weight ratios MoE layer number `layer` (in view order) sees while `earlier` thresholds skip before it."""
    block = view(model)[layer]
    seen: list[Tensor] = []
    handle = block.router.register_forward_hook(lambda _m, _i, out: seen.append(weight_ratios(out[1])))
    if earlier:
        reroute(model, skip_threshold=[*earlier, *[None] * (len(view(model)) - len(earlier))],
                renormalize=renormalize)
    try:
        for ids in tqdm(ws, desc=f"skip calibration, MoE layer {block.layer}", unit="window", leave=False):
            model(input_ids=ids[None])
    finally:
        handle.remove()
        unroute(model)
    return torch.cat(seen)


def _thresholds(model: nn.Module, ws: list[Tensor], target: float, renormalize: bool | None) -> list[float]:
    """Layer by layer, each calibrated on what it routes with the layers before it already skipping."""
    out: list[float] = []
    for layer in range(len(view(model))):
        out.append(quantile_threshold(_ratios(model, ws, layer, out, renormalize), target))
    return out


@torch.no_grad()
def _loss(model: nn.Module, ws: list[Tensor]) -> float:
    total, count = 0.0, 0
    for ids in ws:
        logits = model(input_ids=ids[None, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum"))
        count += ids.numel() - 1
    return total / count


def calibrate_skip(model: nn.Module, docs: Sequence[TextDoc], tokenizer, target: float | None = 0.5,
                   max_loss_increase: float | None = None, max_tokens: int = DEFAULT_TOKENS,
                   steps: int = 6, renormalize: bool | None = False) -> list[float]:
    """Per-layer skip thresholds (in `view(model)` order) from the routing weights `model` gives the calibration
    `docs`: each layer's `target` quantile of w_j / w_top over the second and later experts, or, with
    `max_loss_increase` (nats per token), the largest common target (by `steps` bisection steps) whose
    calibration loss rises by at most that much. `renormalize`: the rule the thresholds will be applied with
    (see `apply_skip`)."""
    if max_loss_increase is None and (target is None or not 0 <= target <= 1):
        raise ConfigError(f"target={target!r}: expected a fraction in [0, 1] of second and later experts to skip")
    if max_loss_increase is not None and not max_loss_increase >= 0:
        raise ConfigError(f"max_loss_increase={max_loss_increase!r}: expected a non-negative loss in nats per token")
    ws = _windows(model, docs, tokenizer, max_tokens)
    if max_loss_increase is None:
        return _thresholds(model, ws, target, renormalize)
    base = _loss(model, ws)
    lo, hi, best = 0.0, 1.0, [0.0] * len(view(model))
    for _ in range(steps):
        mid = (lo + hi) / 2
        thresholds = _thresholds(model, ws, mid, renormalize)
        apply_skip(model, thresholds, renormalize)
        try:
            ok = _loss(model, ws) - base <= max_loss_increase
        finally:
            unroute(model)
        lo, hi, best = (mid, hi, thresholds) if ok else (lo, mid, best)
    return best


@torch.no_grad()
def experts_per_token(model: nn.Module, docs: Sequence[TextDoc], tokenizer, thresholds: Sequence[float],
                      max_tokens: int = DEFAULT_TOKENS, renormalize: bool | None = False) -> list[float]:
    """The average experts per token in each MoE layer when `thresholds` apply, measured on `docs` (the model's
    routing is its family's own again afterwards)."""
    apply_skip(model, thresholds, renormalize)
    try:
        for ids in _windows(model, docs, tokenizer, max_tokens):
            model(input_ids=ids[None])
        return rerouted_experts_per_token(model)
    finally:
        unroute(model)
