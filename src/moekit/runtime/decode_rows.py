"""One decode step for some rows of a `Decoder` batch, the rest sitting it out (what the serving engine's
expert-aware row choice needs when more sequences are resident than one forward takes).

`step_rows`: the chosen rows' cache rows are gathered, one forward runs over them, and the new position is written
back; every other row gets mask 0 at that cache position (a hole, like left padding) and keeps its own position, so
its next token sees exactly what it would have seen without the hole. `compact` closes the holes when the cache is
full: every row's filled positions move, in order, to the end of the filled prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.runtime.decode import Decoder
from moekit.runtime.decode_cache import StaticLayer


def rows_supported(dec: Decoder) -> bool:
    """Whether `dec`'s cache is full attention only (`StaticLayer`), whose rows `step_rows` can gather."""
    return all(type(layer) is StaticLayer for layer in dec.static_layers())


def step_rows(dec: Decoder, rows: Sequence[int], tokens: Tensor) -> Tensor:
    """`Decoder.step` for rows [R] only, tokens [R]; returns their logits [R, V] (module doc)."""
    idx = torch.tensor(list(rows))
    layers = dec.static_layers()
    full = [(layer._k, layer._v) for layer in layers]
    mask = dec.full_mask()
    at = dec.length
    mask[:, at] = 0
    mask[idx, at] = 1
    for layer in layers:
        layer._k, layer._v = layer._k[idx], layer._v[idx]
    try:
        logits = dec.run(tokens.reshape(-1, 1).to(dec.device), dec.positions[idx].unsqueeze(1), mask[idx, :at + 1])
    finally:
        for layer, (k, v) in zip(layers, full, strict=True):
            if layer.length > at:
                k[idx, :, at] = layer._k[:, :, at]
                v[idx, :, at] = layer._v[:, :, at]
            layer._k, layer._v = k, v
            layer.keys, layer.values = k[:, :, :layer.length], v[:, :, :layer.length]
    dec.positions[idx] += 1
    dec.length += 1
    return logits


def compact(dec: Decoder) -> None:
    """Close the holes `step_rows` left (module doc)."""
    mask = dec.full_mask()[:, :dec.length]
    n = mask.sum(1)
    width = int(n.max())
    new_mask = torch.zeros_like(dec.mask)
    for layer in dec.static_layers():
        k, v = torch.zeros_like(layer._k), torch.zeros_like(layer._v)
        for r in range(dec.batch):
            cols = mask[r].nonzero().squeeze(1)
            k[r, :, width - len(cols):width] = layer._k[r, :, cols]
            v[r, :, width - len(cols):width] = layer._v[r, :, cols]
        layer._k, layer._v, layer.length = k, v, width
        layer.keys, layer.values = k[:, :, :width], v[:, :, :width]
    for r in range(dec.batch):
        new_mask[r, width - int(n[r]):width] = 1
    dec.mask, dec.length = new_mask, width
