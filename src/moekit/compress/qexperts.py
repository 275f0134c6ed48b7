"""Quantized experts that run inside moekit's dispatch, and the swap of a model's experts modules for them.

`DispatchedQuantizedExperts` is `qformat.QuantizedExperts` (what a quantized checkpoint carries for plain
transformers) whose forward sorts the assignments by expert (`plan_assignments`) and runs each expert that received
tokens once on its contiguous slice (`run_experts`), dequantizing that expert's weights for the call only, so the
model holds packed codes and scales, never float copies of its experts. It is an `ExpertsLike`: `up_weight(e)` /
`down_weight(e)` dequantize one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compress.qformat import QuantizedExperts, QuantizedMatrix
from moekit.core.dispatch import combine, plan_assignments, run_experts
from moekit.core.experts import Experts
from moekit.errors import ConfigError
from moekit.hf.view import BlockView

QUANT_IMPLS = ("loop", "threads")


class DispatchedQuantizedExperts(QuantizedExperts):
    """`QuantizedExperts` run by moekit's dispatch. `impl`: `loop` (one expert after another, each GEMM on all
    cores) or `threads` (experts side by side on the thread pool, one core each)."""

    expert = Experts.expert

    def __init__(self, *args, impl: str = "loop", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in QUANT_IMPLS:
            raise ConfigError(f"impl={impl!r}: expected one of {', '.join(QUANT_IMPLS)}")
        self.impl = impl

    @property
    def act(self):
        return self.activate

    def up_weight(self, e: int) -> Tensor:
        """Expert e's first projection [2I, H], dequantized."""
        return self.gate_up_q[e].dequantize(self.compute_dtype)

    def down_weight(self, e: int) -> Tensor:
        return self.down_q[e].dequantize(self.compute_dtype)

    def bytes_per_expert(self) -> int:
        m_up, m_down = self.gate_up_q[0], self.down_q[0]
        n = m_up.out_features * m_up.in_features + m_down.out_features * m_down.in_features
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


def quantize_experts(block: BlockView, formats: list[str], group_size: int, impl: str = "loop"
                     ) -> DispatchedQuantizedExperts:
    """A quantized copy of `block`'s experts: expert e in formats[e] (see `qformat`)."""
    src = block.experts
    if len(formats) != src.num_experts:
        raise ConfigError(f"layer {block.layer}: {len(formats)} formats for {src.num_experts} experts; expected one "
                          f"per expert")
    module = src.module
    dtype = src.down_proj.dtype
    gpt_oss = (src.act.alpha, src.act.limit) if block.family.activation == "gpt_oss" else None
    q = DispatchedQuantizedExperts(formats, group_size, src.hidden_size, src.intermediate_size, src.transposed,
                                   src.gate_up_proj_bias is not None, getattr(module, "act_fn", None), gpt_oss,
                                   dtype, "meta", impl=impl)
    with torch.no_grad():
        for e, fmt in enumerate(formats):
            try:
                q.gate_up_q[e] = QuantizedMatrix.from_float(src.up_weight(e), fmt, group_size)
                q.down_q[e] = QuantizedMatrix.from_float(src.down_weight(e), fmt, group_size)
            except ValueError as err:
                raise ConfigError(f"layer {block.layer} expert {e}: {err}") from None
        if src.gate_up_proj_bias is not None:
            q.gate_up_proj_bias = nn.Parameter(src.gate_up_proj_bias.detach().clone(), requires_grad=False)
            q.down_proj_bias = nn.Parameter(src.down_proj_bias.detach().clone(), requires_grad=False)
    return q


def swap_experts(block: BlockView, experts: nn.Module) -> None:
    """Put `experts` in place of `block`'s experts module."""
    setattr(block.block, block.family.experts, experts)
