"""Experts stored as low-rank factors (MC-SMoE's compression of merged experts, SVD part): expert e's gate_up
[2I, H] is gate_up_a[e] @ gate_up_b[e] ([2I, r] @ [r, H]) and its down [H, I] is down_a[e] @ down_b[e]
([H, r] @ [r, I]), so a rank r < H I / (H + I) really saves bytes.

`LowRankExperts` takes the place of a family's experts module (same call: hidden [T, H], top-k indices and weights
[T, k] -> [T, H]) and runs each chosen expert as two thin products per projection. For tools that read experts
through `moekit.hf.view`, `gate_up_proj` / `down_proj` give the dense [E, 2I, H] / [E, H, I] products, computed on
each read. This file needs only torch: `moekit.hf.manifest` copies it into the modeling file of a checkpoint that
holds low-rank layers.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankExperts(nn.Module):
    """num_experts experts of width `intermediate` over hidden size `hidden`, every projection of rank `rank`;
    act_fn(gate) * up."""

    def __init__(self, num_experts, hidden, intermediate, rank, act_fn, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank = num_experts, hidden, intermediate, rank
        self.act_fn = act_fn
        kw = {"dtype": dtype, "device": device}
        self.gate_up_a = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, rank, **kw))
        self.gate_up_b = nn.Parameter(torch.zeros(num_experts, rank, hidden, **kw))
        self.down_a = nn.Parameter(torch.zeros(num_experts, hidden, rank, **kw))
        self.down_b = nn.Parameter(torch.zeros(num_experts, rank, intermediate, **kw))

    @property
    def gate_up_proj(self):
        return self.gate_up_a @ self.gate_up_b

    @property
    def down_proj(self):
        return self.down_a @ self.down_b

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        linear = nn.functional.linear
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            h = linear(linear(hidden_states[token], self.gate_up_b[e]), self.gate_up_a[e])
            gate, up = h.chunk(2, dim=-1)
            y = linear(linear(self.act_fn(gate) * up, self.down_b[e]), self.down_a[e])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def make_lowrank(block, rank, hidden, experts):
    """Replace `block`'s experts module (attribute `experts`) by an empty LowRankExperts of `rank`."""
    old = getattr(block, experts)
    like = old.down_proj
    module = LowRankExperts(like.shape[0], hidden, like.shape[2], rank, old.act_fn, dtype=like.dtype,
                            device=like.device)
    setattr(block, experts, module)
    return module
