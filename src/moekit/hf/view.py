"""`view(model)`: the MoE blocks of a transformers model as moekit sees them, holding the model's own tensors.

A `BlockView` never copies: `view.experts.gate_up_proj is` the model's Parameter, `view.router` is the model's
router module. `HFExperts` exposes a transformers experts module with the attributes moekit's dispatch reads
(`moekit.core.experts.Experts`'s), reading them from the module at every access, so `model.to(...)` or a weight
reload never leaves it holding stale tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.core.experts import Activation, Experts
from moekit.core.routing import Routing
from moekit.errors import ConfigError
from moekit.hf.families import Family, family_of

_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


class _HFGatedAct:
    """A gate/up activation for a `hidden_act` moekit has no name for: act_fn(gate) * up, as transformers does."""

    gated = True

    def __init__(self, act_fn: nn.Module):
        self.act_fn = act_fn

    def __call__(self, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class HFExperts:  # implements moekit.core.experts.ExpertsLike
    """A transformers experts module seen as moekit `Experts` (same attributes and methods, no copies)."""

    up_weight = Experts.up_weight
    down_weight = Experts.down_weight
    expert = Experts.expert
    grouped_weights = Experts.grouped_weights
    bytes_per_expert = Experts.bytes_per_expert

    def __init__(self, module: nn.Module, family: Family, config: Any):
        self.module = module
        self.transposed = family.transposed
        if family.activation == "gpt_oss":
            self.act = Activation("gpt_oss", alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        elif config.hidden_act in _GATED_ACTS:
            self.act = Activation(_GATED_ACTS[config.hidden_act])
        else:
            self.act = _HFGatedAct(module.act_fn)

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.module.gate_up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.module.down_proj

    @property
    def gate_up_proj_bias(self) -> nn.Parameter | None:
        return getattr(self.module, "gate_up_proj_bias", None)

    @property
    def down_proj_bias(self) -> nn.Parameter | None:
        return getattr(self.module, "down_proj_bias", None)

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.module.down_proj.shape[2 if self.transposed else 1]

    @property
    def intermediate_size(self) -> int:
        return self.module.down_proj.shape[1 if self.transposed else 2]


@dataclass
class BlockView:
    """One MoE block. layer: decoder layer index. block / router / shared / shared_gate: the model's own modules
    (None where the family has no shared expert). experts: the experts as moekit `Experts`. k: experts per token
    (PhiMoE's sparsemixer always picks 2, whatever num_experts_per_tok says)."""

    layer: int
    family: Family
    block: nn.Module
    router: nn.Module
    experts: HFExperts
    shared: nn.Module | None
    shared_gate: nn.Module | None
    k: int

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def router_params(self) -> dict[str, Tensor]:
        """The router's own tensors by name: `weight`, plus `bias` (GPT-OSS) or `e_score_correction_bias`
        (DeepSeek-V3)."""
        tensors = dict(self.router.named_parameters(recurse=False))
        tensors.update(self.router.named_buffers(recurse=False))
        return tensors

    def route(self, hidden: Tensor) -> Routing:
        """Route hidden [T, H] with the family's own router (exactly its numerics, training-mode noise included)."""
        logits, weights, indices = self.router(hidden)
        return Routing(logits, weights, indices, probs=_probs(self.family, logits))


def _probs(family: Family, logits: Tensor) -> Tensor:
    """The per-expert scores a balance loss averages: normalised sigmoid for DeepSeek-V3, softmax otherwise."""
    if family.routing == "sigmoid_group_topk":
        scores = torch.sigmoid(logits.float())
        return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    return torch.softmax(logits.float(), dim=-1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers model (a *ForCausalLM or its base model)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__}: expected a transformers model with `layers` on its base model")
    return layers


def view(model: nn.Module) -> list[BlockView]:
    """Every MoE block of `model`, in layer order. Raises a MoekitError for a dense or unsupported model."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__}: expected a transformers model (one with a `config`)")
    family = family_of(config, source=f"{type(model).__name__}.config")
    layers = decoder_layers(model)
    views = []
    for i in family.moe_layers(config):
        if i >= len(layers):
            break
        block = getattr(layers[i], family.block)
        missing = [a for a in (family.router, family.experts, family.shared) if a and not hasattr(block, a)]
        if missing:
            raise ConfigError(f"layer {i}: {type(block).__name__} has no {', '.join(missing)}; expected a "
                              f"{family.name} MoE block as the config's {family.dense_rule!r} rule says")
        experts_module = getattr(block, family.experts)
        views.append(BlockView(
            layer=i, family=family, block=block, router=getattr(block, family.router),
            experts=HFExperts(experts_module, family, config),
            shared=getattr(block, family.shared) if family.shared else None,
            shared_gate=getattr(block, family.shared_gate) if family.shared_gate else None,
            k=2 if family.routing == "sparsemixer" else getattr(block, family.router).top_k))
    return views
