"""The contract every expert storage format keeps (`ExpertsLike`), and what all formats share: the activation
(`Activation`) and the [n, in] x [out, in]^T product (`linear`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core.tune import SMALL_ROWS, small_linear_transposed
from moekit.errors import ConfigError

ACTIVATIONS = ("swiglu", "geglu", "gelu", "gpt_oss")


@dataclass(frozen=True)
class Activation:
    """kind: one of ACTIVATIONS. alpha / limit: GPT-OSS's clamped SwiGLU, (clamp(up) + 1) * g * sigmoid(alpha g)
    with g = min(gate, limit), gate and up interleaved (even / odd columns)."""

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ConfigError(f"activation={self.kind!r}: expected one of {', '.join(ACTIVATIONS)}")

    @property
    def gated(self) -> bool:
        return self.kind != "gelu"

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """[n, 2I] -> gate [n, I], up [n, I]."""
        if self.kind == "gpt_oss":
            return h[..., ::2], h[..., 1::2]
        return h.chunk(2, dim=-1)

    def glu(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return F.silu(gate) * up
        if self.kind == "geglu":
            return F.gelu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __call__(self, h: Tensor) -> Tensor:
        """[n, 2I] (or [n, I] for gelu) -> [n, I]."""
        if not self.gated:
            return F.gelu(h)
        return self.glu(*self.split(h))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [n, in] @ weight[out, in]^T (+ bias). For 2 to 8 rows it may compute (weight @ x^T)^T instead, whichever
    `moekit.core.tune.small_linear_transposed` measured faster on this machine for the shape (CPU BLAS can run
    x @ W^T with so few rows as one matrix-vector product per row, reading the weight once per row)."""
    if x.dim() == 2 and not torch.compiler.is_compiling() and x.shape[0] in SMALL_ROWS \
            and small_linear_transposed(x, weight):  # (under torch.compile: plain F.linear, no Python-side choice)
        y = torch.mm(weight, x.t()).t()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class ExpertsLike(Protocol):
    """What dispatch needs from a set of E experts over hidden size H, whatever their storage format (dense fused
    tensors, a view of another library's experts module, experts of different widths, low-rank factors, quantized
    codes): dispatch only calls these, never asks which format it runs.

    - `expert(x [n, H], e) -> [n, H]`: expert e on its rows, computed as the format computes best (at its own width,
      from its factors or codes). The `loop` path calls only this.
    - `up_weight(e)` [2I, H] (or [I, H] without a gate) / `down_weight(e)` [H, I]: expert e's projections as
      [out, in] float matrices (views where stored so; formats that store something else build them per call,
      zero-padded to the widest expert). The `threads` path reads these, `act` and the biases.
    - `gate_up_proj` / `down_proj` / biases: the fused weights as stored (tensor-likes with `.shape`, `.dtype`,
      `.requires_grad`); `grouped_weights()` both projections as [E, in, out] tensors for `torch._grouped_mm`
      (formats that cannot give them without building every expert leave it out: dispatch then never picks
      `grouped_mm`).
    - `bytes_per_expert()`: bytes an average expert's weights occupy in the compute dtype (what dispatch weighs).
    - `format`: a short name of the storage format (`dense`, `quantized`, ...), part of the autotuner's key.
    """

    gate_up_proj: Tensor
    down_proj: Tensor
    gate_up_proj_bias: Tensor | None
    down_proj_bias: Tensor | None
    act: Callable[[Tensor], Tensor]
    transposed: bool
    num_experts: int
    hidden_size: int
    intermediate_size: int

    def up_weight(self, e: int) -> Tensor: ...
    def down_weight(self, e: int) -> Tensor: ...
    def expert(self, x: Tensor, e: int) -> Tensor: ...
    def grouped_weights(self) -> tuple[Tensor, Tensor]: ...
    def bytes_per_expert(self) -> int: ...


