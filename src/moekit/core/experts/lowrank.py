"""Experts stored as low-rank factors (MC-SMoE's compression of merged experts, SVD part): expert e's gate_up
[2I, H] is gate_up_a[e] @ gate_up_b[e] ([2I, r] @ [r, H]) and its down [H, I] is down_a[e] @ down_b[e]
([H, r] @ [r, I]), so a rank r < H I / (H + I) really saves bytes. GPT-OSS experts (`gpt_oss=(alpha, limit)`)
keep their gate/up rows interleaved as the family does and their biases `gate_up_proj_bias` [E, 2I] and
`down_proj_bias` [E, H] whole.

`LowRankExperts` takes the place of a family's experts module (same call: hidden [T, H], top-k indices and weights
[T, k] -> [T, H]) and runs each chosen expert as two thin products per projection. For tools that read experts
through `moekit.hf.view`, `gate_up_proj` / `down_proj` give the dense products in the family's layout ([E, 2I, H] /
[E, H, I], GPT-OSS's transposed [E, H, 2I] / [E, I, H]), computed on each read. This file needs only torch (and
`glu` from `moekit.core.experts.ragged`): `moekit.hf.manifest` copies both into the modeling file of a checkpoint
that holds low-rank layers.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.core.experts.ragged import glu


class LowRankExperts(nn.Module):
    """num_experts experts of width `intermediate` over hidden size `hidden`, every projection of rank `rank`:
    act_fn(gate) * up, or GPT-OSS's layout and activation when gpt_oss = (alpha, limit)."""

    def __init__(self, num_experts, hidden, intermediate, rank, act_fn=None, dtype=None, device=None, gpt_oss=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank = num_experts, hidden, intermediate, rank
        self.act_fn = act_fn
        self.gpt_oss = None if gpt_oss is None else (float(gpt_oss[0]), float(gpt_oss[1]))
        kw = {"dtype": dtype, "device": device}
        self.gate_up_a = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, rank, **kw))
        self.gate_up_b = nn.Parameter(torch.zeros(num_experts, rank, hidden, **kw))
        self.down_a = nn.Parameter(torch.zeros(num_experts, hidden, rank, **kw))
        self.down_b = nn.Parameter(torch.zeros(num_experts, rank, intermediate, **kw))
        bias = self.gpt_oss is not None
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, **kw)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden, **kw)) if bias else None

    @property
    def gate_up_proj(self):
        w = self.gate_up_a @ self.gate_up_b
        return w if self.gpt_oss is None else w.transpose(1, 2)

    @property
    def down_proj(self):
        w = self.down_a @ self.down_b
        return w if self.gpt_oss is None else w.transpose(1, 2)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        linear = nn.functional.linear
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            h = linear(linear(hidden_states[token], self.gate_up_b[e]), self.gate_up_a[e])
            if self.gpt_oss is None:
                gate, up = h.chunk(2, dim=-1)
            else:
                h = h + self.gate_up_proj_bias[e]
                gate, up = h[:, ::2], h[:, 1::2]
            y = linear(linear(glu(gate, up, self.act_fn, self.gpt_oss), self.down_b[e]), self.down_a[e])
            if self.down_proj_bias is not None:
                y = y + self.down_proj_bias[e]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def make_lowrank(block, rank, hidden, experts):
    """Replace `block`'s experts module (attribute `experts`) by an empty LowRankExperts of `rank` (GPT-OSS's
    layout when the old module has GPT-OSS's `alpha` and `limit`)."""
    old = getattr(block, experts)
    gpt_oss = (old.alpha, old.limit) if hasattr(old, "limit") else None
    like = old.down_proj
    num_experts, intermediate = like.shape[0], like.shape[1] if gpt_oss else like.shape[2]
    module = LowRankExperts(num_experts, hidden, intermediate, rank, getattr(old, "act_fn", None), dtype=like.dtype,
                            device=like.device, gpt_oss=gpt_oss)
    setattr(block, experts, module)
    return module
