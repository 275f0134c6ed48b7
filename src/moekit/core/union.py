"""Union of Experts (UoE): a transformer decomposed into equivalent experts, with routing at two levels.

Equivalent decomposition (as tensor parallelism partitions the matrices): a dense MLP W_down act(W_up x) with
intermediate width I splits into E experts of width I / E (expert e owns rows e I/E .. (e+1) I/E of W_up, of the
gate and up halves alike, and the same columns of W_down), and the dense MLP is exactly the sum of all E experts
(`decompose_mlp`). Multi-head attention is already the sum over heads of W_o^h attention_h(x): each head is an
expert (`MixtureOfAttention` with per-head K/V; `decompose_attention` reads a dense attention's weights into it).

Hierarchical routing (`UnionOfExperts`), moekit's reading of UoE's two paradigms:
  1. data selection: a selector scores every token, g_t = sigmoid(w . x_t); per sequence only the top
     c = ceil(data_fraction T) tokens enter the block (patch-wise selection; the others get 0 and keep their
     residual);
  2. expert selection: each selected token picks its top-k experts (MLP experts or attention heads) by a
     softmax router, weights renormalised over the k and multiplied by g_t (so the selector trains);
     `expert_level="sequence"` instead picks one set of k experts per sequence from the router on the sequence's
     mean (the authors' SMHA, YujiaoYang-work/UoE `SMHA_v1.py`, routes each sample's heads from its flattened
     sequence, which fixes the length; the mean is moekit's length-free stand-in, and their head outputs are
     summed unweighted where moekit weights them).
With data_fraction = 1, k = E and the router's weights replaced by 1 (`routing_for(..., uniform=True)`) the block
is the dense block again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.attention import AttentionExpertsConfig, MixtureOfAttention
from moekit.core.experts import Activation, Experts
from moekit.core.layer import LossWeights
from moekit.core.routing import Routing, check_k, softmax_topk
from moekit.core.step import Dispatcher
from moekit.errors import ConfigError, ShapeError


def decompose_mlp(up: Tensor, down: Tensor, num_experts: int, activation: str = "gelu",
                  gate: Tensor | None = None) -> Experts:
    """Experts whose sum is the dense MLP down @ act(up x) (or down @ (act(gate x) * up x) when `gate` is given,
    activation 'swiglu' / 'geglu'). up / gate [I, H], down [H, I]; I must divide by `num_experts`."""
    width, hidden = up.shape
    if num_experts < 1 or width % num_experts:
        raise ConfigError(f"num_experts={num_experts!r}: expected a divisor of the intermediate size {width}")
    if down.shape != (hidden, width) or (gate is not None and gate.shape != up.shape):
        raise ShapeError(f"down {list(down.shape)}: expected [{hidden}, {width}] (and gate like up)")
    part = width // num_experts
    act = Activation(activation)
    if act.gated != (gate is not None):
        raise ConfigError(f"activation={activation!r}: {'needs' if act.gated else 'takes no'} gate")
    experts = Experts(num_experts, hidden, part, act, dtype=up.dtype, device=up.device)
    with torch.no_grad():
        for e in range(num_experts):
            rows = slice(e * part, (e + 1) * part)
            first = up[rows] if gate is None else torch.cat([gate[rows], up[rows]])
            experts.gate_up_proj[e].copy_(first)
            experts.down_proj[e].copy_(down[:, rows])
    return experts


def decompose_attention(moa: MixtureOfAttention, q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> None:
    """Load a dense multi-head attention's q / k / v [E w, H] and o [H, E w] into `moa` (per-expert K/V; w = an
    expert's heads times head_dim, so expert e gets heads e n .. (e + 1) n - 1 of the dense attention)."""
    e, w = moa.num_heads, moa.q_proj.shape[1]
    if moa.config.shared_kv:
        raise ConfigError("decompose_attention: expected shared_kv=False (every head keeps its own K / V)")
    for name, t in (("q", q), ("k", k), ("v", v), ("o", o.t())):
        if t.shape != (e * w, moa.config.hidden_size):
            raise ShapeError(f"{name}: expected {[e * w, moa.config.hidden_size]} (o transposed), got {list(t.shape)}")
    with torch.no_grad():
        moa.q_proj.copy_(q.view(e, w, -1))
        moa.k_proj.copy_(k.view(e, w, -1))
        moa.v_proj.copy_(v.view(e, w, -1))
        moa.o_proj.copy_(o.view(o.shape[0], e, w).permute(1, 0, 2))


@dataclass
class UoEConfig:
    """kind: 'mlp' (experts from a decomposed MLP) or 'attention' (heads); data_fraction: share of each sequence's
    tokens the block processes, in (0, 1]; k experts per selected token."""

    hidden_size: int
    num_experts: int
    k: int = 2
    kind: str = "mlp"
    intermediate_size: int = 64
    activation: str = "gelu"
    data_fraction: float = 0.5
    expert_level: str = "token"

    def check(self) -> None:
        if self.expert_level not in ("token", "sequence"):
            raise ConfigError(f"expert_level={self.expert_level!r}: expected 'token' or 'sequence'")
        if self.kind not in ("mlp", "attention"):
            raise ConfigError(f"kind={self.kind!r}: expected 'mlp' or 'attention'")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"num_experts={self.num_experts!r}: expected a positive integer")
        check_k(self.k, self.num_experts)
        if not 0 < self.data_fraction <= 1:
            raise ConfigError(f"data_fraction={self.data_fraction!r}: expected a number in (0, 1]")


class UnionOfExperts(nn.Module):
    """Two-level routing over equivalently decomposed experts (`UoEConfig`); forward(x [B, T, H]) -> (y, routing)."""

    def __init__(self, config: UoEConfig):
        super().__init__()
        config.check()
        self.config = config
        h, e = config.hidden_size, config.num_experts
        self.selector = nn.Linear(h, 1)
        self.router = nn.Linear(h, e, bias=False)
        if config.kind == "mlp":
            if config.intermediate_size % e:
                raise ConfigError(f"intermediate_size={config.intermediate_size}: expected a multiple of num_experts")
            self.experts = Experts(e, h, config.intermediate_size // e, config.activation)
        else:
            none = LossWeights(balance=0.0, z=0.0, seq=0.0)
            self.experts = MixtureOfAttention(AttentionExpertsConfig(h, e, config.k, head_dim=max(1, h // e),
                                                                     shared_kv=False, loss_weights=none))

    def select_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(selected [B, T] bool, g [B, T]): per sequence the top ceil(data_fraction T) tokens by g."""
        g = torch.sigmoid(self.selector(x).squeeze(-1))
        count = max(1, math.ceil(self.config.data_fraction * x.shape[1]))
        top = g.topk(count, dim=1).indices
        selected = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top, True)
        return selected, g

    def routing_for(self, x: Tensor, uniform: bool = False) -> Routing:
        """The two-level routing over the B*T tokens: unselected tokens have every slot masked off."""
        selected, g = self.select_tokens(x)
        flat = x.reshape(-1, x.shape[-1])
        k = self.config.num_experts if uniform else self.config.k
        if self.config.expert_level == "sequence":  # one choice per sequence, shared by its tokens
            seq = softmax_topk(self.router(x.mean(1)), k, normalize=True)
            t = x.shape[1]
            r = Routing(seq.logits.repeat_interleave(t, 0), seq.weights.repeat_interleave(t, 0),
                        seq.indices.repeat_interleave(t, 0), probs=seq.probs.repeat_interleave(t, 0))
        else:
            r = softmax_topk(self.router(flat), k, normalize=True)
        weights = torch.ones_like(r.weights) if uniform else r.weights * g.reshape(-1, 1)
        mask = selected.reshape(-1, 1).expand_as(r.indices)
        return Routing(r.logits, weights * mask, r.indices, mask=mask.clone(), probs=r.probs,
                       aux={"selected": selected, "gate": g})

    def forward(self, x: Tensor, uniform: bool = False) -> tuple[Tensor, Routing]:
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ShapeError(f"x: expected shape [B, T, {self.config.hidden_size}], got {list(x.shape)}")
        routing = self.routing_for(x, uniform)
        if self.config.kind == "attention":
            return self.experts(x, routing=routing).hidden, routing
        step = Dispatcher(self.experts, None, "auto")(x.reshape(-1, x.shape[-1]), routing)
        return step.out.view_as(x), routing
