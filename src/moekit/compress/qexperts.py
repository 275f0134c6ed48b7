"""A model's experts quantized into `moekit.core.experts.quantized.DispatchedQuantizedExperts` (the format, run by
moekit's dispatch), and the swap of a model's experts modules for them. `quantize_experts` reads experts of different
widths (`moekit.core.experts.ragged`) at their true widths, so the neurons pruning removed are not stored again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.core.experts.qformat import QuantizedExperts, QuantizedMatrix
from moekit.core.experts.quantized import DispatchedQuantizedExperts
from moekit.core.experts.ragged import RaggedExperts
from moekit.errors import ConfigError
from moekit.hf.view import BlockView


def expert_widths(block: BlockView) -> list[int]:
    """Each expert's width (its own for experts of different widths, else the layer's)."""
    module = block.experts.module
    widths = getattr(module, "widths", None) if isinstance(module, (RaggedExperts, QuantizedExperts)) else None
    return list(widths) if widths is not None else [block.experts.intermediate_size] * block.num_experts


def expert_parts(block: BlockView, e: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Expert e of `block` at its own width w: gate_up [2w, H] in the family's row order (gate rows then up rows, or
    interleaved for GPT-OSS), down [H, w], gate_up bias [2w] and down bias [H] (None without biases)."""
    src, module = block.experts, block.experts.module
    down_b = None if src.down_proj_bias is None else src.down_proj_bias[e]
    if not isinstance(module, RaggedExperts):
        up_b = None if src.gate_up_proj_bias is None else src.gate_up_proj_bias[e]
        return src.up_weight(e), src.down_weight(e), up_b, down_b
    up, down, up_b = module.parts(e)  # gate rows then up rows
    if module.gpt_oss is not None:
        w = module.widths[e]
        up = torch.stack((up[:w], up[w:]), 1).reshape(up.shape)
        up_b = torch.stack((up_b[:w], up_b[w:]), 1).reshape(-1)
    return up, down, up_b, down_b


def quantize_experts(block: BlockView, formats: list[str], group_size: int, impl: str = "auto"
                     ) -> DispatchedQuantizedExperts:
    """A quantized copy of `block`'s experts: expert e in formats[e] (see `qformat`), at its own width."""
    src = block.experts
    if len(formats) != src.num_experts:
        raise ConfigError(f"layer {block.layer}: {len(formats)} formats for {src.num_experts} experts; expected one "
                          f"per expert")
    module = src.module
    dtype = src.down_proj.dtype
    gpt_oss = (src.act.alpha, src.act.limit) if block.family.activation == "gpt_oss" else None
    widths = expert_widths(block) if isinstance(module, RaggedExperts) else None
    q = DispatchedQuantizedExperts(formats, group_size, src.hidden_size, src.intermediate_size, src.transposed,
                                   src.gate_up_proj_bias is not None, getattr(module, "act_fn", None), gpt_oss,
                                   dtype, "meta", widths=widths, impl=impl)
    up_biases, down_biases = [], []
    with torch.no_grad():
        for e, fmt in enumerate(formats):
            up, down, up_b, down_b = expert_parts(block, e)
            try:
                q.gate_up_q[e] = QuantizedMatrix.from_float(up, fmt, group_size)
                q.down_q[e] = QuantizedMatrix.from_float(down, fmt, group_size)
            except ValueError as err:
                raise ConfigError(f"layer {block.layer} expert {e}: {err}") from None
            up_biases.append(up_b)
            down_biases.append(down_b)
        if src.gate_up_proj_bias is not None:
            up_bias = torch.cat(up_biases) if widths is not None else torch.stack(up_biases)
            q.register_parameter("gate_up_bias_packed" if widths is not None else "gate_up_proj_bias",
                                 nn.Parameter(up_bias.detach().clone(), requires_grad=False))
            q.down_proj_bias = nn.Parameter(torch.stack(down_biases).detach().clone(), requires_grad=False)
    return q


def swap_experts(block: BlockView, experts: nn.Module) -> None:
    """Put `experts` in place of `block`'s experts module."""
    setattr(block.block, block.family.experts, experts)
