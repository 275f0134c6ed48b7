"""Quantized experts that run inside moekit's dispatch, and the swap of a model's experts modules for them.

`DispatchedQuantizedExperts` is `qformat.QuantizedExperts` (what a quantized checkpoint carries for plain
transformers) whose forward sorts the assignments by expert (`plan_assignments`) and runs each expert that received
tokens once on its contiguous slice (`run_experts`), dequantizing that expert's weights for the call only, so the
model holds packed codes and scales, never float copies of its experts. It is an `ExpertsLike`: `up_weight(e)` /
`down_weight(e)` dequantize one expert (zero-padded to the widest expert where experts differ in width; `expert`
runs each at its own width). `quantize_experts` reads experts of different widths (`moekit.hf.ragged`) at their
true widths, so the neurons pruning removed are not stored again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compress.qformat import QuantizedExperts, QuantizedMatrix
from moekit.core.dispatch import combine, plan_assignments, run_experts
from moekit.errors import ConfigError
from moekit.hf.ragged import RaggedExperts
from moekit.hf.view import BlockView

QUANT_IMPLS = ("loop", "threads")


class DispatchedQuantizedExperts(QuantizedExperts):
    """`QuantizedExperts` run by moekit's dispatch. `impl`: `loop` (one expert after another, each GEMM on all
    cores) or `threads` (experts side by side on the thread pool, one core each)."""

    def __init__(self, *args, impl: str = "loop", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in QUANT_IMPLS:
            raise ConfigError(f"impl={impl!r}: expected one of {', '.join(QUANT_IMPLS)}")
        self.impl = impl

    @property
    def act(self):
        return self.activate

    def up_weight(self, e: int) -> Tensor:
        """Expert e's first projection [2I, H], dequantized (zero-padded to the widest expert)."""
        return self.up_matrix(e, self.compute_dtype)

    def down_weight(self, e: int) -> Tensor:
        return self.down_matrix(e, self.compute_dtype)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on x [n, H] (in the compute dtype) -> [n, H], at its own width."""
        return self.run_expert(x, e)

    def bytes_per_expert(self) -> int:
        """Dequantized bytes of an average expert (experts may differ in width): what dispatch's choice weighs."""
        n = sum(m.out_features * m.in_features for m in (*self.gate_up_q, *self.down_q)) // self.num_experts
        return n * torch.empty(0, dtype=self.compute_dtype).element_size()

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden [T, H], top_k_index / top_k_weights [T, k] -> [T, H]. An index of num_experts (or < 0) means no
        expert, and an assignment of weight 0 (a skipped expert, `moekit.compress.skip`) is not computed."""
        valid = (top_k_index >= 0) & (top_k_index < self.num_experts) & (top_k_weights != 0)
        mask = None if bool(valid.all()) else valid
        plan = plan_assignments(top_k_index, top_k_weights, self.num_experts, mask=mask)
        if plan.token.numel() == 0:
            return torch.zeros_like(hidden_states)
        xs = hidden_states.index_select(0, plan.token).to(self.compute_dtype)
        return combine(run_experts(xs, plan, self, self.impl), plan, hidden_states)


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


def quantize_experts(block: BlockView, formats: list[str], group_size: int, impl: str = "loop"
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
