"""Dense experts, stored as transformers v5 stores them.

Routed experts are fused 3D parameters, so a Hugging Face model's tensors can be used as views:
  gate_up_proj [E, 2I, H] (gate rows first, then up rows), down_proj [E, H, I], optional biases [E, 2I] / [E, H].
`transposed=True` stores them as GPT-OSS does: gate_up_proj [E, H, 2I], down_proj [E, I, H].
The plain `gelu` MLP has no gate: gate_up_proj is [E, I, H].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.experts.base import Activation, linear
from moekit.errors import ConfigError


class Experts(nn.Module):
    """E feed-forward experts of width I over hidden size H, as fused 3D parameters."""

    format = "dense"

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
