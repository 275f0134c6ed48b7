"""Quantized expert weights: storage formats, packing, and an experts module that dequantizes per expert.

Torch only, on purpose: a quantized checkpoint carries this file verbatim (as `moekit_qformat.py`) so plain
transformers can load it with `trust_remote_code=True`.

Each expert projection is an [out, in] matrix quantized in groups of `group` consecutive inputs of a row:
  int8, int4  symmetric: scale s = max|w| / qmax (qmax 127 or 7), q = round(w / s), so |w - q s| <= s / 2.
              int8 codes are int8; int4 codes + 8 are packed two per byte (low nibble first).
  ternary     MoTE / BitNet b1.58 absmean: s = mean|w| over the group, q = clamp(round(w / s), -1, 1) in {-1, 0, 1};
              codes q + 1 packed four per byte (2 bits each, lowest bits first).
  bf16        the weight rounded to bfloat16 (16 bits, no scale).
Scales are float16, rounded up where needed so no int8/int4 code is clipped. A row whose length is not a multiple
of the group is zero-padded; the group is the row length (rounded up to a multiple of 4) when that is shorter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BITS = {"ternary": 2, "int4": 4, "int8": 8, "bf16": 16}
_QMAX = {"int8": 127, "int4": 7}
_FP16_MAX = 65504.0


def effective_group(in_features: int, group_size: int) -> int:
    """The group used for rows of `in_features` values: `group_size`, or the row rounded up to 4 if shorter."""
    return min(group_size, 4 * math.ceil(in_features / 4))


def packed_shape(fmt: str, out_features: int, in_features: int, group_size: int) -> tuple[tuple, tuple | None]:
    """Shapes of (codes, scales) of an [out, in] matrix; scales None for bf16."""
    if fmt == "bf16":
        return (out_features, in_features), None
    g = effective_group(in_features, group_size)
    groups = math.ceil(in_features / g)
    per_byte = 8 // BITS[fmt]
    return (out_features, groups * g // per_byte), (out_features, groups)


def packed_nbytes(fmt: str, out_features: int, in_features: int, group_size: int) -> int:
    """Bytes held for one quantized [out, in] matrix (codes plus float16 scales)."""
    codes, scales = packed_shape(fmt, out_features, in_features, group_size)
    code_bytes = math.prod(codes) * (2 if fmt == "bf16" else 1)
    return code_bytes + (0 if scales is None else 2 * math.prod(scales))


def _grouped(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w [out, in] -> zero-padded float32 groups [out, groups, g] and a mask of the real (unpadded) values."""
    out_features, in_features = w.shape
    g = effective_group(in_features, group_size)
    pad = math.ceil(in_features / g) * g - in_features
    real = torch.ones(out_features, in_features, dtype=torch.bool, device=w.device)
    w = F.pad(w.float(), (0, pad)).view(out_features, -1, g)
    return w, F.pad(real, (0, pad)).view(out_features, -1, g)


def encode(w: Tensor, fmt: str, group_size: int) -> tuple[Tensor, Tensor | None]:
    """Quantize w [out, in] into (codes, float16 scales [out, groups]) as the module docstring says."""
    if fmt == "bf16":
        return w.detach().to(torch.bfloat16).contiguous(), None
    groups, real = _grouped(w.detach(), group_size)
    if fmt == "ternary":
        s = groups.abs().sum(-1) / real.sum(-1)
        scale = s.clamp(max=_FP16_MAX).to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (groups / scale.float().unsqueeze(-1)).round().clamp(-1, 1)
        codes = (q + 1).to(torch.uint8).view(w.shape[0], -1, 4)
        packed = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
        return packed.contiguous(), scale
    qmax = _QMAX[fmt]
    s = groups.abs().amax(-1) / qmax
    if float(s.max()) > _FP16_MAX:
        raise ValueError(f"weights up to {float(s.max()) * qmax:.3g}: too large for float16 {fmt} scales")
    scale = s.to(torch.float16)
    scale = torch.where(scale.float() < s, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (groups / scale.float().unsqueeze(-1)).round().clamp(-qmax, qmax).view(w.shape[0], -1)
    if fmt == "int8":
        return q.to(torch.int8).contiguous(), scale
    nibbles = (q + 8).to(torch.uint8).view(w.shape[0], -1, 2)
    return (nibbles[..., 0] | nibbles[..., 1] << 4).contiguous(), scale


def decode(codes: Tensor, scale: Tensor | None, fmt: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """The dequantized [out, in] matrix in `dtype` (computed in float32, then cast)."""
    if fmt == "bf16":
        return codes.to(dtype)
    out_features = codes.shape[0]
    if fmt == "int8":
        q = codes.float()
    elif fmt == "int4":
        q = torch.stack((codes & 15, codes >> 4), -1).view(out_features, -1).float() - 8
    else:
        q = torch.stack([(codes >> shift) & 3 for shift in (0, 2, 4, 6)], -1).view(out_features, -1).float() - 1
    w = q.view(out_features, scale.shape[1], -1) * scale.float().unsqueeze(-1)
    return w.view(out_features, -1)[:, :in_features].to(dtype)


class QuantizedMatrix(nn.Module):
    """One expert projection [out, in] in format `fmt`: buffers `codes` and (not for bf16) `scale`."""

    def __init__(self, fmt: str, out_features: int, in_features: int, group_size: int,
                 device: torch.device | str | None = None):
        super().__init__()
        if fmt not in BITS:
            raise ValueError(f"format {fmt!r}: expected one of {', '.join(BITS)}")
        self.fmt, self.out_features, self.in_features = fmt, out_features, in_features
        codes, scales = packed_shape(fmt, out_features, in_features, group_size)
        code_dtype = {"bf16": torch.bfloat16, "int8": torch.int8}.get(fmt, torch.uint8)
        self.register_buffer("codes", torch.empty(codes, dtype=code_dtype, device=device))
        scale = None if scales is None else torch.empty(scales, dtype=torch.float16, device=device)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, w: Tensor, fmt: str, group_size: int) -> QuantizedMatrix:
        m = cls(fmt, w.shape[0], w.shape[1], group_size, device="meta")
        m.codes, m.scale = encode(w, fmt, group_size)
        return m

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """[out, in] in `dtype`."""
        return decode(self.codes, self.scale, self.fmt, self.in_features, dtype)

    def extra_repr(self) -> str:
        return f"{self.fmt}, out={self.out_features}, in={self.in_features}"


class ExpertWeights:
    """Stands for a fused 3D expert weight ([E, out, in], or [E, in, out] when `transposed`) held quantized:
    `weights[e]` dequantizes expert e alone, zero-padded to the layer's widest expert, in the stored orientation, as
    transformers' experts index theirs."""

    requires_grad = False  # read by moekit's threaded dispatch

    def __init__(self, experts: QuantizedExperts, gate_up: bool):
        self.experts, self.gate_up = experts, gate_up
        hidden, width = experts.hidden_size, experts.intermediate_size
        out, cols = (2 * width, hidden) if gate_up else (hidden, width)
        rows, cols = (cols, out) if experts.transposed else (out, cols)
        self.shape = torch.Size((experts.num_experts, rows, cols))
        self.transposed, self.dtype = experts.transposed, experts.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.experts.down_q[0].codes.device

    def __getitem__(self, e: int) -> Tensor:
        e = int(e)
        w = self.experts.up_matrix(e, self.dtype) if self.gate_up else self.experts.down_matrix(e, self.dtype)
        return w.t() if self.transposed else w

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()


class QuantizedExperts(nn.Module):
    """A transformers experts module (fused `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], or GPT-OSS's
    transposed layout with biases and clamped interleaved SwiGLU) with every expert held quantized, each in its own
    format. `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` dequantizes only
    the experts some token is routed to; an index equal to num_experts (or negative) means "no expert".
    `gate_up_proj` / `down_proj` read like the fused weights (`ExpertWeights`).

    `widths` (experts of different widths, as atomic-expert pruning leaves them): expert e is quantized at its own
    width w_e, gate_up [2 w_e, H] (gate rows then up rows, or interleaved for GPT-OSS) and down [H, w_e];
    `intermediate_size` is then the widest, GPT-OSS's gate/up biases are packed in `gate_up_bias_packed`
    [sum 2 w_e] in the same row order, and `gate_up_proj` / `down_proj` / `gate_up_proj_bias` read zero-padded to
    the widest expert in the family's layout (exact: a padded neuron outputs 0)."""

    def __init__(self, formats: list[str], group_size: int, hidden_size: int, intermediate_size: int,
                 transposed: bool = False, bias: bool = False, act_fn: nn.Module | None = None,
                 gpt_oss: tuple[float, float] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, widths: list[int] | None = None):
        super().__init__()
        self.formats, self.group_size = list(formats), group_size
        self.num_experts, self.hidden_size, self.intermediate_size = len(formats), hidden_size, intermediate_size
        self.transposed, self.compute_dtype = transposed, dtype
        self.act_fn, self.gpt_oss = act_fn, gpt_oss  # gpt_oss: (alpha, limit) of its clamped SwiGLU
        self.widths = None if widths is None else [int(w) for w in widths]
        sizes = self.widths or [intermediate_size] * len(formats)
        if len(sizes) != len(formats) or not 0 < max(sizes) <= intermediate_size or min(sizes) < 1:
            raise ValueError(f"widths {sizes}: expected one width in [1, {intermediate_size}] per expert")
        self.gate_up_q = nn.ModuleList(QuantizedMatrix(f, 2 * w, hidden_size, group_size, device)
                                       for f, w in zip(formats, sizes, strict=True))
        self.down_q = nn.ModuleList(QuantizedMatrix(f, hidden_size, w, group_size, device)
                                    for f, w in zip(formats, sizes, strict=True))
        kw = {"dtype": dtype, "device": device}
        if self.widths is None:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(len(formats), 2 * intermediate_size, **kw),
                                                  requires_grad=False) if bias else None
        else:  # `gate_up_proj_bias` reads padded (__getattr__)
            self.offsets = [sum(sizes[:e]) for e in range(len(sizes))]
            self.register_parameter("gate_up_bias_packed", nn.Parameter(torch.zeros(2 * sum(sizes), **kw),
                                                                        requires_grad=False) if bias else None)
        self.down_proj_bias = nn.Parameter(torch.zeros(len(formats), hidden_size, **kw),
                                           requires_grad=False) if bias else None

    @classmethod
    def like(cls, experts: nn.Module, formats: list[str], group_size: int, transposed: bool, bias: bool,
             widths: list[int] | None = None):
        """An empty quantized stand-in for a transformers experts module, for weights about to be loaded."""
        w = experts.down_proj
        hidden, width = (w.shape[2], w.shape[1]) if transposed else (w.shape[1], w.shape[2])
        alpha_limit = (experts.alpha, experts.limit) if hasattr(experts, "limit") else None
        return cls(formats, group_size, hidden, width, transposed, bias, getattr(experts, "act_fn", None),
                   alpha_limit, w.dtype, w.device, widths)

    def __getattr__(self, name: str):
        if name == "gate_up_proj_bias" and "gate_up_bias_packed" in self.__dict__["_parameters"]:
            packed = self._parameters["gate_up_bias_packed"]
            return None if packed is None else torch.stack([self._pad_gate_up(self.up_bias(e))
                                                            for e in range(self.num_experts)])
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.float()`, ... move the dtype weights dequantize to, as they would a float weight's."""
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def _pad_gate_up(self, t: Tensor) -> Tensor:
        """An expert's gate_up rows t [2 w, ...] -> [2 I, ...], zero-padded as the family lays gate/up out."""
        width = self.intermediate_size
        w = t.shape[0] // 2
        if w == width:
            return t
        out = t.new_zeros(2 * width, *t.shape[1:])
        if self.gpt_oss is None:
            out[:w], out[width: width + w] = t[:w], t[w:]
        else:
            out[: 2 * w] = t
        return out

    def up_bias(self, e: int) -> Tensor | None:
        """Expert e's gate_up bias at its own width [2 w_e] (None without biases)."""
        if self.widths is None:
            return None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
        packed = self._parameters["gate_up_bias_packed"]
        o, w = self.offsets[e], self.widths[e]
        return None if packed is None else packed[2 * o: 2 * o + 2 * w]

    def up_matrix(self, e: int, dtype: torch.dtype) -> Tensor:
        """Expert e's gate_up [2 I, H] dequantized, zero-padded to the widest expert."""
        return self._pad_gate_up(self.gate_up_q[e].dequantize(dtype))

    def down_matrix(self, e: int, dtype: torch.dtype) -> Tensor:
        """Expert e's down [H, I] dequantized, zero-padded to the widest expert."""
        w = self.down_q[e].dequantize(dtype)
        return F.pad(w, (0, self.intermediate_size - w.shape[1]))

    @property
    def gate_up_proj(self) -> ExpertWeights:
        return ExpertWeights(self, gate_up=True)

    @property
    def down_proj(self) -> ExpertWeights:
        return ExpertWeights(self, gate_up=False)

    def quant_spec(self) -> dict:
        """What a checkpoint records to rebuild this module: formats per expert, the group size (and the widths of
        experts of different widths)."""
        spec = {"formats": list(self.formats), "group_size": self.group_size}
        return spec if self.widths is None else {**spec, "widths": list(self.widths)}

    def activate(self, h: Tensor) -> Tensor:
        """[n, 2I] -> [n, I]: act_fn(gate) * up, or GPT-OSS's clamped SwiGLU on interleaved gate/up columns."""
        if self.gpt_oss is None:
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        alpha, limit = self.gpt_oss
        gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    def run_expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on x [n, H] -> [n, H], its weights dequantized for this call only."""
        up_b = self.up_bias(e)
        down_b = None if self.down_proj_bias is None else self.down_proj_bias[e]
        h = F.linear(x, self.gate_up_q[e].dequantize(x.dtype), up_b)
        return F.linear(self.activate(h), self.down_q[e].dequantize(x.dtype), down_b)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.run_expert(hidden_states[token], e) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        counts = {f: self.formats.count(f) for f in BITS if f in self.formats}
        widths = "" if self.widths is None else f", widths={self.widths}"
        return f"num_experts={self.num_experts}, group_size={self.group_size}, formats={counts}{widths}"
