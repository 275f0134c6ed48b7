"""Quantized expert products through PyTorch's packed weight-only CPU kernels, without dequantizing the matrix.

For one `QuantizedMatrix` (format in `qformat`: int8 / int4 codes, float16 scales per group of `g` inputs of a row):
  int8, one group per row  `torch._weight_int8pack_mm(x, codes, scale)` on the codes as stored (no copy).
  int8, G groups per row   one `_weight_int8pack_mm` per group (the kernel takes one scale per row), summed; the
                           codes are copied once into G contiguous [out, g] blocks (the kernel needs contiguous ones).
  int4                     `torch._convert_weight_to_int4pack_for_cpu` packs the nibbles once (g in 32/64/128/256;
                           outputs padded to a multiple of 16 with zero rows), then
                           `torch._weight_int4pack_mm_for_cpu(x, packed, g, scale_and_zero)` with zero 0: the kernel
                           computes (nibble - 8) * scale + zero, and our nibbles are code + 8.
The kernels take float32, bfloat16 and float16 activations and accumulate in float32. A matrix the kernels cannot
run (ternary, bf16, int4 with an unsupported group) gets no kernel: `pack` returns None and says why once
per reason (`QuantKernelWarning`). `torch._dyn_quant_matmul_4bit` is not used: it quantizes the activations to int8
too, so its results differ from the weight-only format by more than the format's own error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core.experts.qformat import QuantizedMatrix

INT4_GROUPS = (32, 64, 128, 256)
_warned: set[str] = set()

Kernel = Callable[[Tensor, Tensor | None], Tensor]  # (x [n, in], bias [out] or None) -> [n, out]


class QuantKernelWarning(UserWarning):
    """A quantized matrix runs by dequantizing it, because no packed CPU kernel takes its format or shape."""


def _fallback(kind: str, reason: str) -> None:
    """Say once per process and kind of limit that matrices fall back to dequantizing."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"{reason}; such experts run by dequantizing per call (slower; said once)", QuantKernelWarning,
                      stacklevel=5)


def _padded(x: Tensor, columns: int) -> Tensor:
    return x if x.shape[-1] == columns else F.pad(x, (0, columns - x.shape[-1]))


def pack(m: QuantizedMatrix, dtype: torch.dtype) -> Kernel | None:
    """A function computing x @ W^T (+ bias) for activations of `dtype` from `m`'s codes without dequantizing W,
    or None (with a one-time warning) where no kernel runs this format and shape."""
    if m.fmt == "int8" and hasattr(torch, "_weight_int8pack_mm"):
        return _pack_int8(m, dtype)
    if m.fmt == "int4" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return _pack_int4(m, dtype)
    if m.fmt in ("int8", "int4"):
        _fallback(f"{m.fmt}-missing", f"{m.fmt}: this torch has no packed {m.fmt} CPU kernel")
    return None


def _pack_int8(m: QuantizedMatrix, dtype: torch.dtype) -> Kernel:
    codes, scale = m.codes, m.scale.to(dtype)  # codes [out, G g], scale [out, G]
    groups = scale.shape[1]
    columns = codes.shape[1]
    if groups == 1:
        s = scale[:, 0].contiguous()

        def int8_rows(x: Tensor, bias: Tensor | None) -> Tensor:
            y = torch._weight_int8pack_mm(_padded(x, columns).contiguous(), codes, s)
            return y if bias is None else y + bias
        return int8_rows
    g = columns // groups
    blocks = [codes[:, i * g: (i + 1) * g].contiguous() for i in range(groups)]
    scales = [scale[:, i].contiguous() for i in range(groups)]

    def int8_groups(x: Tensor, bias: Tensor | None) -> Tensor:
        x = _padded(x, columns)
        y = torch._weight_int8pack_mm(x[:, :g].contiguous(), blocks[0], scales[0]).float()
        for i in range(1, groups):
            y += torch._weight_int8pack_mm(x[:, i * g: (i + 1) * g].contiguous(), blocks[i], scales[i])
        y = y.to(x.dtype)
        return y if bias is None else y + bias
    return int8_groups


def _pack_int4(m: QuantizedMatrix, dtype: torch.dtype) -> Kernel | None:
    codes, scale = m.codes, m.scale  # codes [out, G g / 2] (two nibbles a byte, low first), scale [out, G]
    out_features, groups = scale.shape
    columns = 2 * codes.shape[1]
    g = columns // groups
    if g not in INT4_GROUPS:
        _fallback("int4-group", f"int4 with group {g} (first seen): the packed kernel needs a group of "
                  f"{'/'.join(map(str, INT4_GROUPS))}")
        return None
    rows = -(-out_features // 16) * 16  # the kernel packs outputs by 16: padded with zero weights (nibble 8)
    nibbles = torch.stack((codes & 15, codes >> 4), -1).view(out_features, columns).to(torch.int32)
    nibbles = F.pad(nibbles, (0, 0, 0, rows - out_features), value=8)
    packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, 2)
    scales = F.pad(scale.t().to(dtype), (0, rows - out_features), value=1.0)
    scale_zero = torch.stack((scales, torch.zeros_like(scales)), -1).contiguous()  # [G, rows, 2]

    def int4(x: Tensor, bias: Tensor | None) -> Tensor:
        y = torch._weight_int4pack_mm_for_cpu(_padded(x, columns).contiguous(), packed, g, scale_zero)
        y = y if rows == out_features else y[:, :out_features]
        return y if bias is None else y + bias
    return int4
