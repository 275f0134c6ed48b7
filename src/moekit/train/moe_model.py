"""A transformers causal LM whose MoE blocks are moekit's own `MoE` layers (any registered router), for training.

`use_moekit_layers(model, moe_layer)` replaces every MoE block of a transformers MoE model with an `MoEBlock` that
runs a `moekit.MoE` of the same sizes (hidden size, expert width, number of experts, k, shared experts) built with
the extra keyword arguments `moe_layer` (e.g. {"router": "top_p", "router_options": {"p": 0.5}}). The block keeps
the layer's last `MoEOutput` so the trainer reads the routing and the auxiliary losses from it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moekit.core.layer import LossWeights, MoE, MoEOutput
from moekit.errors import ConfigError


class MoEBlock(nn.Module):
    """Stands in for a transformers MoE block: hidden [B, S, H] -> [B, S, H] through `moe` (an `MoE` or an
    `ExpertParallelMoE`; both take `token_ids`). `token_ids` [B, S], when set, goes to the layer for routers that
    route by token id."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.last: MoEOutput | None = None
        self.token_ids: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        token_ids = None if self.token_ids is None else self.token_ids.reshape(-1)
        self.last = self.moe(hidden_states, token_ids=token_ids)
        return self.last.hidden


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The `MoEBlock`s of `model` in layer order (empty for a model that keeps its transformers blocks)."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def use_moekit_layers(model: nn.Module, moe_layer: dict[str, Any], balance: float = 0.01,
                      z: float = 0.0) -> list[MoEBlock]:
    """Swap every MoE block of the transformers model `model` for a freshly initialised `moekit.MoE` of the same
    sizes built with `moe_layer`'s keyword arguments; returns the new blocks. Seeded by the caller. The layers'
    loss weights default to `balance` and `z` (a `loss_weights` dict in `moe_layer` overrides them)."""
    import moekit.core as core
    import moekit.hf as mh
    from moekit.hf.view import decoder_layers

    if not isinstance(moe_layer, dict):
        raise ConfigError(f"recipe field moe_layer={moe_layer!r}: expected a dict of moekit.MoE keyword arguments")
    fixed = {"hidden_size", "intermediate_size", "num_experts"}
    if fixed & moe_layer.keys():
        raise ConfigError(f"recipe field moe_layer: {sorted(fixed & moe_layer.keys())} come from the model config; "
                          "expected only other moekit.MoE arguments (router, router_options, k, ...)")
    blocks = []
    for v in mh.view(model):
        kwargs: dict[str, Any] = {"k": v.k}
        if v.shared is not None:
            kwargs.update(num_shared_experts=1, shared_intermediate_size=mh.FAMILIES[v.family.model_type]
                          .shared_width(model.config), shared_gate=v.shared_gate is not None)
        kwargs.update(moe_layer)
        kwargs["loss_weights"] = LossWeights(**{"balance": balance, "z": z, **moe_layer.get("loss_weights", {})})
        try:
            moe = MoE(v.experts.hidden_size, v.experts.intermediate_size, v.num_experts, **kwargs)
        except TypeError as e:
            raise ConfigError(f"recipe field moe_layer: {e}; expected moekit.MoE keyword arguments") from None
        block = MoEBlock(moe)
        setattr(decoder_layers(model)[v.layer], v.family.block, block)
        blocks.append(block)
    link = getattr(core, "link_layers", None)
    if link is not None:
        link([b.moe for b in blocks])
    return blocks
