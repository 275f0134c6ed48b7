"""Experts of different widths inside one MoE layer (atomic-expert pruning leaves them so), stored packed so the
bytes really drop: expert e's gate rows then up rows are rows [2 o_e, 2 o_e + 2 w_e) of `gate_up_packed`
[sum 2 w, H] and its down columns are columns [o_e, o_e + w_e) of `down_packed` [H, sum w], o_e the widths before e.

`RaggedExperts` takes the place of a family's experts module (same call: hidden [T, H], top-k indices and weights
[T, k] -> [T, H]). For tools that read experts through `moekit.hf.view`, `gate_up_proj` / `down_proj` give the
zero-padded [E, 2 I_max, H] / [E, H, I_max] tensors (exact: padded neurons output 0), computed on each read, so a
ragged layer can be read and run but not edited in place. This file needs only torch: `moekit.hf.manifest`
copies `RaggedExperts` and `make_ragged` into the modeling file of a checkpoint that holds ragged layers.
"""

from __future__ import annotations

import torch
from torch import nn


class RaggedExperts(nn.Module):
    """len(widths) experts, expert e of width widths[e], over hidden size `hidden`; act_fn(gate) * up."""

    def __init__(self, widths, hidden, act_fn, dtype=None, device=None):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.num_experts = len(self.widths)
        self.hidden_dim = hidden
        self.act_fn = act_fn
        self.offsets = [sum(self.widths[:e]) for e in range(self.num_experts)]
        total = sum(self.widths)
        self.gate_up_packed = nn.Parameter(torch.zeros(2 * total, hidden, dtype=dtype, device=device))
        self.down_packed = nn.Parameter(torch.zeros(hidden, total, dtype=dtype, device=device))

    def pack(self, gates, ups, downs):
        """Fill from per-expert gate [w_e, H], up [w_e, H], down [H, w_e] tensors."""
        with torch.no_grad():
            for e, (g, u, d) in enumerate(zip(gates, ups, downs, strict=True)):
                o, w = self.offsets[e], self.widths[e]
                self.gate_up_packed[2 * o: 2 * o + w] = g
                self.gate_up_packed[2 * o + w: 2 * o + 2 * w] = u
                self.down_packed[:, o: o + w] = d

    def parts(self, e):
        """Expert e's gate_up [2 w_e, H] (gate rows, then up rows) and down [H, w_e] (views)."""
        o, w = self.offsets[e], self.widths[e]
        return self.gate_up_packed[2 * o: 2 * o + 2 * w], self.down_packed[:, o: o + w]

    @property
    def intermediate_dim(self):
        return max(self.widths)

    @property
    def gate_up_proj(self):
        width = max(self.widths)
        out = self.gate_up_packed.new_zeros(self.num_experts, 2 * width, self.hidden_dim)
        for e, w in enumerate(self.widths):
            gate_up = self.parts(e)[0]
            out[e, :w], out[e, width: width + w] = gate_up[:w], gate_up[w:]
        return out

    @property
    def down_proj(self):
        out = self.down_packed.new_zeros(self.num_experts, self.hidden_dim, max(self.widths))
        for e, w in enumerate(self.widths):
            out[e, :, :w] = self.parts(e)[1]
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts or self.widths[e] == 0:
                continue
            token, slot = torch.where(top_k_index == e)
            gate_up, down = self.parts(e)
            gate, up = nn.functional.linear(hidden_states[token], gate_up).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, down)
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def make_ragged(block, widths, hidden, experts):
    """Replace `block`'s experts module (attribute `experts`) by an empty RaggedExperts of `widths`."""
    old = getattr(block, experts)
    like = old.gate_up_proj
    setattr(block, experts, RaggedExperts(widths, hidden, old.act_fn, dtype=like.dtype, device=like.device))
    return getattr(block, experts)
