"""Experts of different widths inside one MoE layer (atomic-expert pruning leaves them so), stored packed so the
bytes really drop: expert e's gate rows then up rows are rows [2 o_e, 2 o_e + 2 w_e) of `gate_up_packed`
[sum 2 w, H] and its down columns are columns [o_e, o_e + w_e) of `down_packed` [H, sum w], o_e the widths before e.
GPT-OSS experts (`gpt_oss=(alpha, limit)`: biases and a clamped SwiGLU) add `gate_up_bias_packed` [sum 2 w], laid
out like the rows, and `down_proj_bias` [E, H].

`RaggedExperts` takes the place of a family's experts module (same call: hidden [T, H], top-k indices and weights
[T, k] -> [T, H]). For tools that read experts through `moekit.hf.view`, `gate_up_proj` / `down_proj` (and
`gate_up_proj_bias`) give the zero-padded tensors in the family's own layout ([E, 2 I_max, H] / [E, H, I_max], or
GPT-OSS's transposed [E, H, 2 I_max] with gate/up interleaved and [E, I_max, H]); exact, since a padded neuron
(zero weights and bias) outputs 0. They are computed on each read, so a ragged layer can be read and run but not
edited in place. This file needs only torch: `moekit.hf.manifest` copies `glu`, `RaggedExperts` and `make_ragged`
into the modeling file of a checkpoint that holds ragged layers.
"""

from __future__ import annotations

import torch
from torch import nn


def glu(gate, up, act_fn, gpt_oss):
    """act_fn(gate) * up, or with gpt_oss = (alpha, limit) GPT-OSS's clamped SwiGLU:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit)."""
    if gpt_oss is None:
        return act_fn(gate) * up
    alpha, limit = gpt_oss
    gate = gate.clamp(max=limit)
    return (up.clamp(min=-limit, max=limit) + 1) * (gate * torch.sigmoid(gate * alpha))


class RaggedExperts(nn.Module):
    """len(widths) experts, expert e of width widths[e], over hidden size `hidden`: act_fn(gate) * up, or GPT-OSS's
    layout and activation when gpt_oss = (alpha, limit)."""

    def __init__(self, widths, hidden, act_fn=None, dtype=None, device=None, gpt_oss=None):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.num_experts = len(self.widths)
        self.hidden_dim = hidden
        self.act_fn = act_fn
        self.gpt_oss = None if gpt_oss is None else (float(gpt_oss[0]), float(gpt_oss[1]))
        self.offsets = [sum(self.widths[:e]) for e in range(self.num_experts)]
        total = sum(self.widths)
        kw = {"dtype": dtype, "device": device}
        self.gate_up_packed = nn.Parameter(torch.zeros(2 * total, hidden, **kw))
        self.down_packed = nn.Parameter(torch.zeros(hidden, total, **kw))
        bias = self.gpt_oss is not None
        self.gate_up_bias_packed = nn.Parameter(torch.zeros(2 * total, **kw)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, hidden, **kw)) if bias else None

    def pack(self, gates, ups, downs, gate_biases=None, up_biases=None, down_bias=None):
        """Fill from per-expert gate [w_e, H], up [w_e, H], down [H, w_e] tensors (and, for GPT-OSS, per-expert
        gate / up biases [w_e] and down_bias [E, H])."""
        with torch.no_grad():
            for e, (g, u, d) in enumerate(zip(gates, ups, downs, strict=True)):
                o, w = self.offsets[e], self.widths[e]
                self.gate_up_packed[2 * o: 2 * o + w] = g
                self.gate_up_packed[2 * o + w: 2 * o + 2 * w] = u
                self.down_packed[:, o: o + w] = d
                if self.gate_up_bias_packed is not None:
                    self.gate_up_bias_packed[2 * o: 2 * o + w] = gate_biases[e]
                    self.gate_up_bias_packed[2 * o + w: 2 * o + 2 * w] = up_biases[e]
            if self.down_proj_bias is not None:
                self.down_proj_bias.copy_(down_bias)

    def parts(self, e):
        """Expert e's gate_up [2 w_e, H] (gate rows, then up rows), down [H, w_e] and gate_up bias [2 w_e] (None
        without biases); views."""
        o, w = self.offsets[e], self.widths[e]
        bias = None if self.gate_up_bias_packed is None else self.gate_up_bias_packed[2 * o: 2 * o + 2 * w]
        return self.gate_up_packed[2 * o: 2 * o + 2 * w], self.down_packed[:, o: o + w], bias

    @property
    def intermediate_dim(self):
        return max(self.widths)

    def _padded_gate_up(self, packed, trailing):
        """[E, 2 I_max, *trailing] zero-padded, gate/up as the family orders them (interleaved for GPT-OSS)."""
        width = max(self.widths)
        out = packed.new_zeros(self.num_experts, 2 * width, *trailing)
        for e, w in enumerate(self.widths):
            o = self.offsets[e]
            gate, up = packed[2 * o: 2 * o + w], packed[2 * o + w: 2 * o + 2 * w]
            if self.gpt_oss is None:
                out[e, :w], out[e, width: width + w] = gate, up
            else:
                out[e, 0: 2 * w: 2], out[e, 1: 2 * w: 2] = gate, up
        return out

    @property
    def gate_up_proj(self):
        out = self._padded_gate_up(self.gate_up_packed, (self.hidden_dim,))
        return out if self.gpt_oss is None else out.transpose(1, 2)

    @property
    def gate_up_proj_bias(self):
        return None if self.gate_up_bias_packed is None else self._padded_gate_up(self.gate_up_bias_packed, ())

    @property
    def down_proj(self):
        out = self.down_packed.new_zeros(self.num_experts, self.hidden_dim, max(self.widths))
        for e, w in enumerate(self.widths):
            out[e, :, :w] = self.parts(e)[1]
        return out if self.gpt_oss is None else out.transpose(1, 2)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Each expert runs once on its tokens at its own width (views of the packed tensors: no padding, no copy
        of weights); one stable sort groups the assignments by expert (an index outside [0, E) means none)."""
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < self.num_experts), flat, self.num_experts)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        start = 0
        for e, n in enumerate(counts[: self.num_experts]):
            if not n:
                continue
            chosen = order[start: start + n]
            start += n
            token, slot = chosen // k, chosen % k
            gate_up, down, bias = self.parts(e)
            h = nn.functional.linear(hidden_states[token], gate_up, bias)
            gate, up = h[:, : self.widths[e]], h[:, self.widths[e]:]  # an expert of width 0 adds its bias only
            down_bias = None if self.down_proj_bias is None else self.down_proj_bias[e]
            y = nn.functional.linear(glu(gate, up, self.act_fn, self.gpt_oss), down, down_bias)
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def make_ragged(block, widths, hidden, experts):
    """Replace `block`'s experts module (attribute `experts`) by an empty RaggedExperts of `widths` (GPT-OSS's
    layout when the old module has GPT-OSS's `alpha` and `limit`)."""
    old = getattr(block, experts)
    like = old.down_proj
    gpt_oss = (old.alpha, old.limit) if hasattr(old, "limit") else None
    module = RaggedExperts(widths, hidden, getattr(old, "act_fn", None), dtype=like.dtype, device=like.device,
                           gpt_oss=gpt_oss)
    setattr(block, experts, module)
    return module
