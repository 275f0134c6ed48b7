"""Small helpers the catalog's routers share: reshaping or freezing the base router weight, slot packing."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.core.routers import Router


def resize_weight(router: Router, rows: int, cols: int) -> None:
    """Replace the router's `weight [E, H]` (and bias) by a freshly initialised `[rows, cols]` one."""
    router.weight = nn.Parameter(torch.empty(rows, cols))
    if router.bias is not None:
        router.bias = nn.Parameter(torch.zeros(rows))
    nn.init.uniform_(router.weight, -1.0 / math.sqrt(cols), 1.0 / math.sqrt(cols))


def freeze_weight(router: Router) -> None:
    """Turn the router's weight into a buffer: a fixed random router that is saved but never trained."""
    weight = router.weight.detach().clone()
    del router.weight
    router.register_buffer("weight", weight)


def drop_weight(router: Router) -> None:
    """Remove the router's weight (routers that need no logits: hash, random)."""
    del router.weight


def pack_chosen(chosen: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """chosen [T, E] bool, scores [T, E] -> (indices, weights, mask) [T, m], m = the most experts any token has
    (at least 1): each token's chosen experts, best score first, then padding (mask False, weight 0)."""
    width = max(1, int(chosen.sum(-1).max())) if chosen.numel() else 1
    key = torch.where(chosen, scores, torch.full_like(scores, float("-inf")))
    _, indices = torch.sort(key, dim=-1, descending=True, stable=True)
    indices = indices[:, :width]
    mask = chosen.gather(1, indices)
    weights = scores.gather(1, indices) * mask
    return indices, weights, mask
