"""Expert weights, stored as transformers v5 stores them, and their activations.

Routed experts are fused 3D parameters, so a Hugging Face model's tensors can be used as views:
  gate_up_proj [E, 2I, H] (gate rows first, then up rows), down_proj [E, H, I], optional biases [E, 2I] / [E, H].
`transposed=True` stores them as GPT-OSS does: gate_up_proj [E, H, 2I], down_proj [E, I, H].
The plain `gelu` MLP has no gate: gate_up_proj is [E, I, H].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """x [n, in] @ weight[out, in]^T (+ bias). For 2 or 3 rows it computes (weight @ x^T)^T: CPU BLAS runs
    x @ W^T with so few rows as one matrix-vector product per row, reading the weight once per row, while
    W @ x^T reads it once (measured 2-2.5x faster for an expert at 2-3 rows; `moekit bench layer` decode-8x2)."""
    if 2 <= x.shape[0] <= 3 and x.dim() == 2:
        y = torch.mm(weight, x.t()).t()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class ExpertsLike(Protocol):
    """What dispatch needs from a set of experts: moekit's `Experts`, or a view of another library's experts module
    over its own tensors (`moekit.hf.HFExperts`)."""

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


class Experts(nn.Module):
    """E feed-forward experts of width I over hidden size H, as fused 3D parameters."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: Activation | str = "swiglu",
        bias: bool = False,
        transposed: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act = activation if isinstance(activation, Activation) else Activation(activation)
        self.transposed = transposed
        up_width = (2 if self.act.gated else 1) * intermediate_size
        kw = {"dtype": dtype, "device": device}
        up_shape = (num_experts, hidden_size, up_width) if transposed else (num_experts, up_width, hidden_size)
        down_shape = (num_experts, intermediate_size, hidden_size) if transposed else (
            num_experts, hidden_size, intermediate_size)
        self.gate_up_proj = nn.Parameter(torch.empty(up_shape, **kw))
        self.down_proj = nn.Parameter(torch.empty(down_shape, **kw))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, up_width, **kw)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.gate_up_proj, self.hidden_size), (self.down_proj, self.intermediate_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        for b in (self.gate_up_proj_bias, self.down_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def up_weight(self, e: int) -> Tensor:
        """Expert e's first projection as an [out, in] matrix (a view, transposed if stored transposed)."""
        w = self.gate_up_proj[e]
        return w.t() if self.transposed else w

    def down_weight(self, e: int) -> Tensor:
        w = self.down_proj[e]
        return w.t() if self.transposed else w

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Run expert e on x [n, H] -> [n, H]."""
        up_bias = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
        down_bias = None if self.down_proj_bias is None else self.down_proj_bias[e]
        return linear(self.act(linear(x, self.up_weight(e), up_bias)), self.down_weight(e), down_bias)

    def grouped_weights(self) -> tuple[Tensor, Tensor]:
        """Both projections as [E, in, out] for `torch._grouped_mm` (views, no copy)."""
        if self.transposed:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.transpose(-2, -1), self.down_proj.transpose(-2, -1)

    def bytes_per_expert(self) -> int:
        n = self.gate_up_proj[0].numel() + self.down_proj[0].numel()
        if self.gate_up_proj_bias is not None:
            n += self.gate_up_proj_bias[0].numel() + self.down_proj_bias[0].numel()
        return n * self.gate_up_proj.element_size()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.act.kind}, transposed={self.transposed}")


class SharedExperts(nn.Module):
    """Experts every token goes through, fused into one MLP of width `num * intermediate_size` (the sum of n
    MLPs equals one MLP over their concatenated rows). Named as transformers names them (gate_proj, up_proj,
    down_proj). With `gate=True` the output is scaled by sigmoid(x w_g) (Qwen2-MoE's shared_expert_gate)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: Activation | str = "swiglu",
        gate: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.act = activation if isinstance(activation, Activation) else Activation(activation)
        kw = {"dtype": dtype, "device": device, "bias": False}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw) if self.act.gated else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, **kw) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        up = self.up_proj(x)
        h = F.gelu(up) if self.gate_proj is None else self.act.glu(self.gate_proj(x), up)
        out = self.down_proj(h)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out
