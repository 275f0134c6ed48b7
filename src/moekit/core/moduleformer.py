"""ModuleFormer: a block of stick-breaking attention experts and feed-forward experts, balanced by a mutual-
information loss while pre-training, concentrated on few modules while fine-tuning, extended and pruned by module.

Block: h = x + MoA(norm(x)) (top-k routed stick-breaking heads with shared K/V, `moekit.core.attention`), then
y = h + MoE(norm(h)) (top-k routed feed-forward experts). For a module group with router probabilities p_t [E]
over a batch, and the marginal p = mean_t p_t:

    load balancing (mutual information between tokens and modules):  L_MI = -H(p) + mean_t H(p_t)
    load concentration (fine-tuning on one task):                     L_LC = H(p)

L_MI is smallest when every token is sure of its modules and the batch uses all of them evenly; L_LC pushes a
task's tokens onto few modules, so the others can be pruned (`prune_modules`) for a lighter model, and
`add_modules` gives new data fresh modules while the old ones stay as they were (freeze them to avoid
forgetting). Both losses are computed for the attention and the feed-forward groups (`losses`).

Checked against the authors' code (IBM/ModuleFormer `moduleformer/utils/gate.py`): its 'mi' auxiliary loss is
-(H(e) - H(e|x)), this L_MI. That code gates with the raw top-k probabilities where moekit's routers renormalise
them over the k (so pruning modules no token chooses leaves outputs exactly unchanged); L_LC's form H(p) is
moekit's reading of the paper's load concentration (it is not in that file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.attention import AttentionExpertsConfig, MixtureOfAttention
from moekit.core.experts import Experts
from moekit.core.layer import LossWeights, MoE
from moekit.core.routing import Routing
from moekit.errors import ConfigError


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def mutual_information_loss(probs: Tensor) -> Tensor:
    """-H(mean_t p_t) + mean_t H(p_t) for probs [T, E]."""
    return -_entropy(probs.mean(0)) + _entropy(probs).mean()


def concentration_loss(probs: Tensor) -> Tensor:
    """H(mean_t p_t)."""
    return _entropy(probs.mean(0))


@dataclass
class ModuleFormerConfig:
    """hidden_size; num_heads / head_k / head_dim: the attention experts; num_experts / expert_k / expert_size:
    the feed-forward experts; mi_weight / concentration_weight: the losses' weights (non-negative)."""

    hidden_size: int
    num_heads: int = 8
    head_k: int = 2
    head_dim: int | None = None
    num_experts: int = 8
    expert_k: int = 2
    expert_size: int = 64
    mi_weight: float = 0.01
    concentration_weight: float = 0.0

    def check(self) -> None:
        for name in ("mi_weight", "concentration_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a non-negative number")
        if not isinstance(self.expert_k, int) or not 1 <= self.expert_k <= self.num_experts:
            raise ConfigError(f"expert_k={self.expert_k!r}: expected an integer from 1 to num_experts")


@dataclass
class ModuleFormerOutput:
    hidden: Tensor
    head_routing: Routing
    expert_routing: Routing
    losses: dict[str, Tensor]
    aux_loss: Tensor


class ModuleFormerBlock(nn.Module):
    def __init__(self, config: ModuleFormerConfig):
        super().__init__()
        config.check()
        self.config = config
        h = config.hidden_size
        none = LossWeights(balance=0.0, z=0.0, seq=0.0)
        self.attn = MixtureOfAttention(AttentionExpertsConfig(h, config.num_heads, config.head_k, config.head_dim,
                                                              kind="stickbreaking", loss_weights=none))
        self.ffn = MoE(h, config.expert_size, config.num_experts, config.expert_k, activation="gelu",
                       loss_weights=none)
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)

    def forward(self, x: Tensor) -> ModuleFormerOutput:
        """x [B, T, H]."""
        a = self.attn(self.norm1(x))
        h = x + a.hidden
        f = self.ffn(self.norm2(h))
        losses: dict[str, Tensor] = {}
        aux = x.new_zeros((), dtype=torch.float32)
        for group, routing in (("attention", a.routing), ("ffn", f.routing)):
            probs = routing.probs if routing.probs is not None else torch.softmax(routing.logits.float(), -1)
            losses[f"mi_{group}"] = mutual_information_loss(probs)
            losses[f"concentration_{group}"] = concentration_loss(probs)
            aux = aux + self.config.mi_weight * losses[f"mi_{group}"]
            aux = aux + self.config.concentration_weight * losses[f"concentration_{group}"]
        return ModuleFormerOutput(h + f.hidden, a.routing, f.routing, losses, aux)

    @torch.no_grad()
    def usage(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(assignments per head [E_attn], per feed-forward expert [E_ffn]) on x."""
        out = self(x)
        return out.head_routing.counts(), out.expert_routing.counts()

    @torch.no_grad()
    def add_modules(self, heads: int = 0, experts: int = 0) -> None:
        """Fresh attention heads and feed-forward experts (with fresh router rows); existing ones unchanged."""
        if heads:
            self.attn.add_heads(heads)
        if experts:
            if not isinstance(experts, int) or experts < 1:
                raise ConfigError(f"experts={experts!r}: expected a non-negative integer")
            old = self.ffn.experts
            fresh = Experts(experts, old.hidden_size, old.intermediate_size, old.act, dtype=old.gate_up_proj.dtype,
                            device=old.gate_up_proj.device)
            self._set_experts(torch.arange(old.num_experts), fresh)

    @torch.no_grad()
    def prune_modules(self, keep_heads: list[int] | None = None, keep_experts: list[int] | None = None) -> None:
        """Keep only the listed heads / experts (in that order); None keeps a group whole."""
        if keep_heads is not None:
            self.attn.prune_heads(keep_heads)
        if keep_experts is not None:
            e = self.ffn.num_experts
            if not keep_experts or len(set(keep_experts)) != len(keep_experts) or \
                    not all(0 <= i < e for i in keep_experts):
                raise ConfigError(f"keep_experts={keep_experts!r}: expected distinct expert indices in [0, {e})")
            if len(keep_experts) < self.ffn.k:
                raise ConfigError(f"keep_experts: {len(keep_experts)} experts; expected at least k={self.ffn.k}")
            self._set_experts(torch.tensor(keep_experts), None)

    def _set_experts(self, rows: Tensor, fresh: Experts | None) -> None:
        old, router = self.ffn.experts, self.ffn.router
        extra = 0 if fresh is None else fresh.num_experts
        new = Experts(len(rows) + extra, old.hidden_size, old.intermediate_size, old.act,
                      dtype=old.gate_up_proj.dtype, device=old.gate_up_proj.device)
        parts_up, parts_down = [old.gate_up_proj[rows]], [old.down_proj[rows]]
        if fresh is not None:
            parts_up.append(fresh.gate_up_proj)
            parts_down.append(fresh.down_proj)
        new.gate_up_proj.copy_(torch.cat(parts_up))
        new.down_proj.copy_(torch.cat(parts_down))
        h = old.hidden_size
        extra_rows = torch.empty(extra, h, dtype=router.weight.dtype, device=router.weight.device)
        nn.init.uniform_(extra_rows, -h ** -0.5, h ** -0.5)
        router.weight = nn.Parameter(torch.cat([router.weight.detach()[rows], extra_rows]))
        if router.bias is not None:
            router.bias = nn.Parameter(torch.cat([router.bias.detach()[rows], router.bias.new_zeros(extra)]))
        router.num_experts = new.num_experts
        self.ffn.experts, self.ffn.num_experts = new, new.num_experts
        self.config.num_experts = new.num_experts
