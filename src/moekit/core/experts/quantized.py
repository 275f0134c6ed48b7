"""Quantized experts run by moekit's dispatch.

`DispatchedQuantizedExperts` is `qformat.QuantizedExperts` (what a quantized checkpoint carries for plain
transformers) whose forward sorts the assignments by expert (`plan_assignments`) and runs each expert that received
tokens once on its contiguous slice (`run_experts`), dequantizing that expert's weights for the call only, so the
model holds packed codes and scales, never float copies of its experts. It is an `ExpertsLike`: `up_weight(e)` /
`down_weight(e)` dequantize one expert (zero-padded to the widest expert where experts differ in width; `expert`
runs each at its own width).

`expert(x, e)` computes each projection through a packed int8/int4 CPU kernel (`qkernels`) where one takes the
format and shape, built once per expert and activation dtype on first use and cached on the module (not saved: the
checkpoint format is unchanged), or by dequantizing the matrix for the call; which of the two is the autotuner's
measured choice per shape class (`moekit.core.tune`, kind `qlinear`), the kernel by default (MOEKIT_TUNE=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core import tune
from moekit.core.dispatch import combine, plan_assignments, run_experts
from moekit.core.experts.qformat import QuantizedExperts, QuantizedMatrix
from moekit.core.experts.qkernels import Kernel, pack
from moekit.errors import ConfigError

QUANT_IMPLS = ("auto", "loop", "threads")


class DispatchedQuantizedExperts(QuantizedExperts):
    """`QuantizedExperts` run by moekit's dispatch. `impl`: `auto` (the tuner's measured choice of the two below,
    `moekit.core.tune`), `loop` (one expert after another, each GEMM on all cores) or `threads` (experts side by
    side on the thread pool, one core each)."""

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in QUANT_IMPLS:
            raise ConfigError(f"impl={impl!r}: expected one of {', '.join(QUANT_IMPLS)}")
        self.impl = impl
        self._kernels: dict[tuple[int, int, torch.dtype], Kernel | None] = {}  # (expert, projection, dtype)

    @property
    def format(self) -> str:
        """`quantized:` and the formats present (part of the autotuner's key)."""
        return "quantized:" + "+".join(sorted(set(self.formats)))

    def _apply(self, fn, recurse=True):
        self._kernels = {}  # packed from the old tensors
        return super()._apply(fn, recurse)

    def _kernel(self, e: int, which: int, m: QuantizedMatrix, dtype: torch.dtype) -> Kernel | None:
        key = (e, which, dtype)
        if key not in self._kernels:
            self._kernels[key] = pack(m, dtype)
        return self._kernels[key]

    def _qlinear(self, x: Tensor, e: int, which: int, bias: Tensor | None) -> Tensor:
        """x [n, in] @ W^T (+ bias), W expert e's projection `which` (0: gate_up, 1: down) at its own width."""
        m = (self.gate_up_q if which == 0 else self.down_q)[e]
        kernel = self._kernel(e, which, m, x.dtype)
        if kernel is None:
            return F.linear(x, m.dequantize(x.dtype), bias)
        shape = (m.fmt, m.out_features, m.in_features, m.scale.shape[1], tune.bucket(x.shape[0]), x.dtype)

        def candidates():
            return {"packed": lambda: kernel(x, bias), "dequant": lambda: F.linear(x, m.dequantize(x.dtype), bias)}

        if tune.choose("qlinear", shape, candidates, "packed") == "packed":
            return kernel(x, bias)
        return F.linear(x, m.dequantize(x.dtype), bias)

    @property
    def act(self):
        return self.activate

    def up_weight(self, e: int) -> Tensor:
        """Expert e's first projection [2I, H], dequantized (zero-padded to the widest expert)."""
        return self.up_matrix(e, self.compute_dtype)

    def down_weight(self, e: int) -> Tensor:
        return self.down_matrix(e, self.compute_dtype)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on x [n, H] (in the compute dtype) -> [n, H], at its own width, each projection through its
        packed kernel or dequantized (`_qlinear`)."""
        up_b = self.up_bias(e)
        down_b = None if self.down_proj_bias is None else self.down_proj_bias[e]
        return self._qlinear(self.activate(self._qlinear(x, e, 0, up_b)), e, 1, down_b)

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
