"""Dense decoder -> native transformers MoE family: each chosen layer's FFN split into experts by a neuron
partition, a router for the split experts, everything else copied.

Targets: Qwen3 -> Qwen3-MoE (layers left dense through `mlp_only_layers`), Llama / Mistral -> Mixtral (every layer).
Both families route by softmax then top-k, renormalised over the k chosen (Qwen3-MoE with `norm_topk_prob`).
MoEfication adds the chosen experts' outputs at weight 1; here the router's logits are scaled so that the largest
possible |logit| is `max_logit` (1e-3 by default), which keeps the order of the experts (the choice) and makes every
chosen weight 1/k within a factor exp(+-2 max_logit); each expert's down projection is multiplied by k. The bound on
|logit| is data-free: the FFN input is RMS-normalised, so |w . x| <= |w| sqrt(H) max|g| with g the norm's weight.
With k = E every expert runs and the converted layer equals the dense FFN within that factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.make.partition import check_split

_DROP = ("architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype")


@dataclass(frozen=True)
class Target:
    moe_type: str
    experts_key: str
    width_key: str
    partial: bool  # whether some layers may stay dense


TARGETS = {
    "qwen3": Target("qwen3_moe", "num_experts", "moe_intermediate_size", partial=True),
    "llama": Target("mixtral", "num_local_experts", "intermediate_size", partial=False),
    "mistral": Target("mixtral", "num_local_experts", "intermediate_size", partial=False),
}


def target_of(config) -> Target:
    """The MoE family a dense config converts to; ConfigError for an MoE or an architecture without a known FFN."""
    import moekit.hf as mh

    model_type = getattr(config, "model_type", None)
    if model_type in mh.FAMILIES:
        raise ConfigError(f"model: {model_type} is already an MoE; expected a dense decoder (to change an MoE's "
                          "experts use `moekit compress`)")
    if model_type not in TARGETS:
        raise ConfigError(f"model: model_type {model_type!r} has no known FFN to split; expected one of "
                          f"{', '.join(sorted(TARGETS))}")
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise ConfigError(f"model: {model_type} with attention_bias / mlp_bias; the MoE family has no biases there")
    return TARGETS[model_type]


def ffn(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp


def moe_config(config, experts: int, k: int, layers: list[int], upcycle: bool = False):
    """The MoE family's config: the dense `config` with E experts of width I/E (or, upcycled, E copies of width I),
    k per token, in `layers`."""
    from transformers import AutoConfig

    target = target_of(config)
    width = config.intermediate_size
    if upcycle and (isinstance(experts, bool) or not isinstance(experts, int) or experts < 1):
        raise ConfigError(f"experts={experts!r}: expected a positive integer")
    expert_width = width if upcycle else check_split(width, experts)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ConfigError(f"k={k!r}: expected an integer in 1..experts={experts}")
    n_layers = config.num_hidden_layers
    if not layers or any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise ConfigError(f"layers={layers}: expected layer indices in 0..{n_layers - 1}")
    kw = {key: value for key, value in config.to_dict().items() if key not in _DROP}
    kw.update({target.experts_key: experts, target.width_key: expert_width, "num_experts_per_tok": k,
               "output_router_logits": False})
    if target.partial:
        kw.update(norm_topk_prob=True, decoder_sparse_step=1, intermediate_size=width,
                  mlp_only_layers=[i for i in range(n_layers) if i not in layers])
    elif sorted(layers) != list(range(n_layers)):
        raise ConfigError(f"layers={layers}: {target.moe_type} has no dense layers; expected every layer "
                          f"(0..{n_layers - 1})")
    return AutoConfig.for_model(target.moe_type, **kw)


def logit_scale(model: nn.Module, layer: int, router: Tensor, max_logit: float) -> float:
    """The factor that bounds the router's |logit| by `max_logit` for any RMS-normalised input."""
    norm = model.model.layers[layer].post_attention_layernorm.weight
    bound = float(router.norm(dim=1).max()) * math.sqrt(router.shape[1]) * float(norm.abs().max())
    return max_logit / max(bound, 1e-30)


def expert_tensors(mlp: nn.Module, partition: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """gate_up_proj [E, 2 I/E, H] (gate rows, then up rows) and down_proj [E, H, I/E] * k from a dense MLP."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate_up = torch.stack([torch.cat([gate[s], up[s]]) for s in partition])
    down = torch.stack([down[:, s] for s in partition]) * k
    return gate_up, down


def upcycled_tensors(mlp: nn.Module, experts: int) -> tuple[Tensor, Tensor]:
    """E copies of the dense FFN: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    return gate_up.expand(experts, -1, -1).clone(), mlp.down_proj.weight.expand(experts, -1, -1).clone()


@torch.no_grad()
def convert(model: nn.Module, experts: dict[int, tuple[Tensor, Tensor]], routers: dict[int, Tensor], k: int,
            max_logit: float | None = 1e-3) -> nn.Module:
    """A new MoE model of the target family with `experts[layer] = (gate_up_proj, down_proj)` and router weights
    `routers[layer] [E, H]`, scaled so that |logit| <= max_logit (None: as given, for upcycled copies, whose
    renormalised weights sum to 1 whatever the router says). Expert widths of I (copies) make it an upcycled
    model. The dense model is left as it was."""
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    if max_logit is not None and not max_logit > 0:
        raise ConfigError(f"max_logit={max_logit}: expected a positive number")
    layers = sorted(experts)
    gate_up0 = experts[layers[0]][0]
    upcycle = gate_up0.shape[1] == 2 * model.config.intermediate_size
    config = moe_config(model.config, gate_up0.shape[0], k, layers, upcycle=upcycle)
    dtype = next(model.parameters()).dtype
    moe = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    state = model.state_dict()
    dense_ffn = {f"model.layers.{i}.mlp.{name}.weight" for i in layers
                 for name in ("gate_proj", "up_proj", "down_proj")}
    result = moe.load_state_dict({n: t for n, t in state.items() if n not in dense_ffn}, strict=False)
    blocks = {b.layer: b for b in mh.view(moe)}
    unfilled = [n for n in result.missing_keys if not any(f"layers.{i}.mlp." in n for i in layers)]
    if unfilled or sorted(blocks) != layers:
        raise ConfigError(f"model: converting to {config.model_type} left {unfilled[:3]} unset; expected the dense "
                          "decoder's weights to cover everything but the FFNs")
    for i in layers:
        block = blocks[i]
        block.experts.gate_up_proj.copy_(experts[i][0])
        block.experts.down_proj.copy_(experts[i][1])
        router = routers[i].to(block.router.weight)
        scale = 1.0 if max_logit is None else logit_scale(model, i, router, max_logit)
        block.router.weight.copy_(router * scale)
    if getattr(model.config, "tie_word_embeddings", False):
        moe.tie_weights()
    return moe
