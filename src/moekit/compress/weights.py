"""Expert weights in one canonical layout every compression method works on, and the surgery that writes new
experts and router rows back into a model's MoE block.

Canonical layout (whatever the family stores): per expert e, `gate [E, I, H]`, `up [E, I, H]`, `down [E, H, I]`
and optional biases `gate_bias / up_bias [E, I]`, `down_bias [E, H]`. Atomic expert (neuron) j of expert e is
(gate[e, j], up[e, j], down[e, :, j]): an expert's output is the sum of its neurons' outputs (plus down_bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.hf.view import BlockView

COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")


@dataclass
class ExpertWeights:
    """gate / up [E, I, H], down [E, H, I], optional gate_bias / up_bias [E, I], down_bias [E, H] (float32)."""

    gate: Tensor
    up: Tensor
    down: Tensor
    gate_bias: Tensor | None = None
    up_bias: Tensor | None = None
    down_bias: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def width(self) -> int:
        return self.gate.shape[1]

    def select(self, experts: list[int]) -> ExpertWeights:
        """The listed experts, in that order."""
        idx = torch.tensor(experts, dtype=torch.long)
        return ExpertWeights(*(None if t is None else t[idx] for t in self.tensors()))

    def tensors(self) -> tuple[Tensor | None, ...]:
        return self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias

    def neurons(self, e: int) -> Tensor:
        """Expert e's atomic experts as feature rows [I, 2H + H] (gate row, up row, down column)."""
        return torch.cat([self.gate[e], self.up[e], self.down[e].t()], dim=1)


def read_experts(block: BlockView) -> ExpertWeights:
    """The block's routed experts in the canonical layout (float32 copies)."""
    ex = block.experts
    gate_up = ex.gate_up_proj.detach().float()
    down = ex.down_proj.detach().float()
    if ex.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # [E, 2I, H], [E, H, I]
    interleaved = block.family.activation == "gpt_oss"
    gate, up = (gate_up[:, ::2], gate_up[:, 1::2]) if interleaved else gate_up.chunk(2, dim=1)
    bias = ex.gate_up_proj_bias
    gate_bias = up_bias = None
    if bias is not None:
        bias = bias.detach().float()
        gate_bias, up_bias = (bias[:, ::2], bias[:, 1::2]) if interleaved else bias.chunk(2, dim=1)
    down_bias = None if ex.down_proj_bias is None else ex.down_proj_bias.detach().float()
    return ExpertWeights(gate.contiguous(), up.contiguous(), down.contiguous(), gate_bias, up_bias, down_bias)


def _fused(w: ExpertWeights, interleaved: bool) -> tuple[Tensor, Tensor | None]:
    """gate_up [E, 2I, H] and its bias [E, 2I] as the family lays them out."""
    if interleaved:
        gate_up = torch.stack([w.gate, w.up], dim=2).flatten(1, 2)
        bias = None if w.gate_bias is None else torch.stack([w.gate_bias, w.up_bias], dim=2).flatten(1, 2)
    else:
        gate_up = torch.cat([w.gate, w.up], dim=1)
        bias = None if w.gate_bias is None else torch.cat([w.gate_bias, w.up_bias], dim=1)
    return gate_up, bias


def write_block(block: BlockView, w: ExpertWeights, router_weight: Tensor, router_bias: Tensor | None = None,
                correction_bias: Tensor | None = None) -> None:
    """Replace the block's experts by `w` and its router rows by router_weight [E', H] (router_bias / the
    DeepSeek-V3 correction_bias [E'] where the router has one), in the model's dtype, and update every expert
    count the modules keep. k is lowered to E' when fewer experts remain; group-limited routing whose groups no
    longer split E' into groups of two or more falls back to one group (plain top-k)."""
    module = block.experts.module
    old = module.gate_up_proj
    like = {"dtype": old.dtype, "device": old.device}
    gate_up, gate_up_bias = _fused(w, block.family.activation == "gpt_oss")
    down = w.down
    if block.experts.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    module.gate_up_proj = nn.Parameter(gate_up.contiguous().to(**like), requires_grad=old.requires_grad)
    module.down_proj = nn.Parameter(down.contiguous().to(**like), requires_grad=old.requires_grad)
    if gate_up_bias is not None:
        module.gate_up_proj_bias = nn.Parameter(gate_up_bias.contiguous().to(**like))
        module.down_proj_bias = nn.Parameter(w.down_bias.contiguous().to(**like))
    for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, w.width)
    write_router(block, router_weight, router_bias, correction_bias)


def write_router(block: BlockView, weight: Tensor, bias: Tensor | None = None,
                 correction_bias: Tensor | None = None) -> None:
    router = block.router
    count = weight.shape[0]
    params = block.router_params()
    old = params["weight"]
    router.weight = nn.Parameter(weight.to(dtype=old.dtype, device=old.device).contiguous(),
                                 requires_grad=old.requires_grad)
    if "bias" in params and params["bias"] is not None:
        if bias is None:
            raise ConfigError(f"layer {block.layer}: the router has a bias; expected new bias values for it")
        router.bias = nn.Parameter(bias.to(params["bias"]).contiguous())
    if "e_score_correction_bias" in params:
        if correction_bias is None:
            raise ConfigError(f"layer {block.layer}: the router has an e_score_correction_bias; expected new values")
        router.e_score_correction_bias = correction_bias.to(params["e_score_correction_bias"]).contiguous()
    for module in (block.block, router, block.experts.module):
        for name in COUNT_ATTRS:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, count)
    if isinstance(router, nn.Linear):
        router.out_features = count
    for module in (block.block, router):
        if isinstance(getattr(module, "top_k", None), int) and module.top_k > count:
            module.top_k = count
        groups = getattr(module, "num_group", None) or getattr(module, "n_group", None)
        if isinstance(groups, int) and groups > 1 and (count % groups or count // groups < 2):
            for name in ("num_group", "n_group", "topk_group"):
                if hasattr(module, name):
                    setattr(module, name, 1)


def sync_config(model: nn.Module, blocks: list[BlockView]) -> None:
    """Make the config describe the blocks where it can: when every MoE layer has the same expert count, that
    count becomes the config's (so the checkpoint saves natively when widths are unchanged); k and routing groups
    follow what `write_router` did."""
    config = model.config
    family = blocks[0].family
    counts = {b.num_experts for b in blocks}
    smallest = min(counts)
    if family.k(config) > smallest:
        setattr(config, family.k_key, smallest)
    if len(counts) == 1:
        setattr(config, family.experts_key, smallest)
    elif getattr(config, "output_router_logits", False):
        config.output_router_logits = False  # transformers' balance loss assumes one expert count for every layer
    for module in (model, getattr(model, "base_model", model)):  # the causal LM keeps copies for its balance loss
        for name in COUNT_ATTRS:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, family.num_experts(config))
        if isinstance(getattr(module, "num_experts_per_tok", None), int):
            module.num_experts_per_tok = family.k(config)
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and groups > 1 and any(b.num_experts % groups or b.num_experts // groups < 2
                                                      for b in blocks):
        config.n_group, config.topk_group = 1, 1
        for b in blocks:
            for name in ("num_group", "n_group", "topk_group"):
                if hasattr(b.router, name):
                    setattr(b.router, name, 1)
