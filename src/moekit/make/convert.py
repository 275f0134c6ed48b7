"""Dense decoder -> native transformers MoE family: each chosen layer's FFN split into experts by a neuron
partition (optionally a shared expert of the neurons most tokens use), a router for the split experts, everything
else copied.

Targets: Qwen3 -> Qwen3-MoE and Qwen2 -> Qwen2-MoE (layers left dense through `mlp_only_layers`), Llama / Mistral
-> Mixtral (every layer), a dense DeepSeek-V3 (first_k_dense_replace = num_hidden_layers) -> DeepSeek-V3 with
routed and shared experts (the converted layers must be the last ones: first_k_dense_replace is a prefix).

How the output stays equal to the dense FFN with every expert chosen (MoEfication adds the chosen experts' outputs
at weight 1):
- softmax families (Qwen3-MoE, Qwen2-MoE, Mixtral; renormalised over the k chosen): the router's logits are scaled
  so that the largest possible |logit| is `max_logit` (1e-3 by default), which keeps the order of the experts (the
  choice) and makes every chosen weight 1/k within a factor exp(+-2 max_logit); each expert's down projection is
  multiplied by k.
- DeepSeek-V3 (weight = sigmoid score / sum of the k chosen scores x routed_scaling_factor r): the same small
  logits make every score 1/2 within (1 +- max_logit / 2), so every chosen weight is r/k within a factor
  (1 +- max_logit); each routed down projection is multiplied by k / r. Its shared expert is added at weight 1.
- Qwen2-MoE's shared expert is multiplied by sigmoid(shared_expert_gate . x): the gate's weight is set to zero, so
  the factor is exactly 1/2, and the shared down projection is multiplied by 2.
The bound on |logit| is data-free: the FFN input is RMS-normalised, so |w . x| <= |w| sqrt(H) max|g| with g the
norm's weight. With k = E every expert runs and the converted layer equals the dense FFN within that factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError

_DROP = ("architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype")


@dataclass(frozen=True)
class Target:
    moe_type: str
    experts_key: str
    width_key: str
    layers: str  # "any": some layers may stay dense (mlp_only_layers); "all": every layer; "suffix": the last ones
    shared: bool = False  # whether the family has a shared expert (then it has one of at least the routed width)


TARGETS = {
    "qwen3": Target("qwen3_moe", "num_experts", "moe_intermediate_size", "any"),
    "qwen2": Target("qwen2_moe", "num_experts", "moe_intermediate_size", "any", shared=True),
    "llama": Target("mixtral", "num_local_experts", "intermediate_size", "all"),
    "mistral": Target("mixtral", "num_local_experts", "intermediate_size", "all"),
    "deepseek_v3": Target("deepseek_v3", "n_routed_experts", "moe_intermediate_size", "suffix", shared=True),
}


def target_of(config) -> Target:
    """The MoE family a dense config converts to; ConfigError for an MoE or an architecture without a known FFN."""
    import moekit.hf as mh

    model_type = getattr(config, "model_type", None)
    family = mh.FAMILIES.get(model_type)
    if family is not None and (model_type not in TARGETS or family.moe_layers(config)):
        raise ConfigError(f"model: {model_type} is already an MoE; expected a dense decoder (to change an MoE's "
                          "experts use `moekit compress`)")
    if model_type not in TARGETS:
        raise ConfigError(f"model: model_type {model_type!r} has no known FFN to split; expected one of "
                          f"{', '.join(sorted(TARGETS))}")
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise ConfigError(f"model: {model_type} with attention_bias / mlp_bias; the MoE family has no biases there")
    return TARGETS[model_type]


def default_shared(config) -> int:
    """Shared experts by default: one where the target family has a shared expert, else none."""
    return int(target_of(config).shared)


def ffn(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp


def expert_width(config, experts: int, shared: int = 0, upcycle: bool = False, parts: int | None = None) -> int:
    """The routed expert width: I / (E + shared) for split experts, I / (parts + shared) when the FFN is split into
    `parts` pieces that the E experts copy (Dynamic-DINO), I for upcycled copies."""
    for name, value, low in (("experts", experts, 1), ("shared", shared, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r}: expected an integer >= {low}")
    target = target_of(config)
    if target.shared and shared < 1:
        raise ConfigError(f"shared={shared}: {target.moe_type} always has a shared expert; expected shared >= 1")
    if not target.shared and shared:
        raise ConfigError(f"shared={shared}: {target.moe_type} has no shared expert; expected shared=0")
    width = config.intermediate_size
    if upcycle:
        if shared > 1:
            raise ConfigError(f"shared={shared}: an upcycled model has one shared copy of the FFN; expected 0 or 1")
        return width
    pieces = experts if parts is None else parts
    if width % (pieces + shared):
        what = f"experts={experts}" if parts is None else f"k={parts} (the FFN's pieces, router dino)"
        what += f" + shared={shared}" if shared else ""
        raise ConfigError(f"{what}: expected a divisor of the FFN width {width} (equal-size experts)")
    return width // (pieces + shared)


def moe_config(config, experts: int, k: int, layers: list[int], upcycle: bool = False, shared: int | None = None,
               parts: int | None = None):
    """The MoE family's config: the dense `config` with E experts of width I/(E + shared) (or, upcycled, E copies
    of width I), `shared` shared experts of the same width, k per token, in `layers`."""
    from transformers import AutoConfig

    target = target_of(config)
    shared = default_shared(config) if shared is None else shared
    width = expert_width(config, experts, shared, upcycle, parts)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ConfigError(f"k={k!r}: expected an integer in 1..experts={experts}")
    n_layers = config.num_hidden_layers
    if not layers or any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise ConfigError(f"layers={layers}: expected layer indices in 0..{n_layers - 1}")
    kw = {key: value for key, value in config.to_dict().items() if key not in _DROP}
    kw.update({target.experts_key: experts, target.width_key: width, "num_experts_per_tok": k,
               "output_router_logits": False})
    if target.layers == "any":
        kw.update(norm_topk_prob=True, decoder_sparse_step=1, intermediate_size=config.intermediate_size,
                  mlp_only_layers=[i for i in range(n_layers) if i not in layers])
    elif target.layers == "all" and sorted(layers) != list(range(n_layers)):
        raise ConfigError(f"layers={layers}: {target.moe_type} has no dense layers; expected every layer "
                          f"(0..{n_layers - 1})")
    elif target.layers == "suffix":
        first = min(layers)
        if sorted(layers) != list(range(first, n_layers)):
            raise ConfigError(f"layers={layers}: {target.moe_type} keeps only its first layers dense "
                              f"(first_k_dense_replace); expected the last layers ({first}..{n_layers - 1})")
        kw.update(first_k_dense_replace=first, n_shared_experts=shared, n_group=1, topk_group=1, norm_topk_prob=True)
    if target.moe_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=shared * width, qkv_bias=True)
    return AutoConfig.for_model(target.moe_type, **kw)


def runnable(model: nn.Module) -> nn.Module:
    """`model` switched to transformers' eager experts where its default grouped_mm cannot run them: float64, or
    an expert width whose rows are not a multiple of 16 bytes (e.g. 9 fp32 neurons). The choice is not saved; a
    checkpoint with such widths loads in transformers with `experts_implementation="eager"`."""
    import moekit.hf as mh

    blocks = mh.view(model) if mh.FAMILIES.get(model.config.model_type) and \
        mh.FAMILIES[model.config.model_type].moe_layers(model.config) else []
    if not blocks:
        return model
    weight = blocks[0].experts.module.down_proj
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) or \
            (weight.shape[-1] * weight.element_size()) % 16:
        model.set_experts_implementation("eager")
    return model


def routed_scale(config, k: int) -> float:
    """What each split expert's down projection is multiplied by so that its chosen weight acts as 1 (see the
    module docstring): k for softmax families, k / routed_scaling_factor for DeepSeek-V3."""
    if target_of(config).moe_type == "deepseek_v3":
        return k / float(config.routed_scaling_factor)
    return float(k)


def shared_scale(config) -> float:
    """The shared expert's down projection factor: 2 for Qwen2-MoE (its gate, zeroed, gives exactly 1/2), else 1."""
    return 2.0 if target_of(config).moe_type == "qwen2_moe" else 1.0


def logit_scale(model: nn.Module, layer: int, router: Tensor, max_logit: float) -> float:
    """The factor that bounds the router's |logit| by `max_logit` for any RMS-normalised input."""
    norm = model.model.layers[layer].post_attention_layernorm.weight
    bound = float(router.norm(dim=1).max()) * math.sqrt(router.shape[1]) * float(norm.abs().max())
    return max_logit / max(bound, 1e-30)


def expert_tensors(mlp: nn.Module, partition: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """gate_up_proj [E, 2 I/E, H] (gate rows, then up rows) and down_proj [E, H, I/E] * scale from a dense MLP."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate_up = torch.stack([torch.cat([gate[s], up[s]]) for s in partition])
    down = torch.stack([down[:, s] for s in partition]) * scale
    return gate_up, down


def shared_tensors(mlp: nn.Module, neurons: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The shared expert's gate_proj [S, H], up_proj [S, H], down_proj [H, S] * scale: the dense MLP's neurons
    `neurons` [S]."""
    return (mlp.gate_proj.weight[neurons], mlp.up_proj.weight[neurons], mlp.down_proj.weight[:, neurons] * scale)


def upcycled_tensors(mlp: nn.Module, experts: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """E copies of the dense FFN: gate_up_proj [E, 2I, H], down_proj [E, H, I] * scale."""
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    return gate_up.expand(experts, -1, -1).clone(), (mlp.down_proj.weight * scale).expand(experts, -1, -1).clone()


@torch.no_grad()
def convert(model: nn.Module, experts: dict[int, tuple[Tensor, Tensor]], routers: dict[int, Tensor], k: int,
            max_logit: float | None = 1e-3, shared: dict[int, tuple[Tensor, Tensor, Tensor]] | None = None
            ) -> nn.Module:
    """A new MoE model of the target family with `experts[layer] = (gate_up_proj, down_proj)`, router weights
    `routers[layer] [E, H]`, scaled so that |logit| <= max_logit (None: as given, for upcycled copies, whose
    renormalised weights sum to a constant whatever the router says), and `shared[layer] = (gate, up, down)`, the
    shared experts' neurons (a multiple of the routed width; the family's shared gate, if any, zeroed). Expert
    widths of I (copies) make it an upcycled model. The dense model is left as it was."""
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    if max_logit is not None and not max_logit > 0:
        raise ConfigError(f"max_logit={max_logit}: expected a positive number")
    layers = sorted(experts)
    gate_up0 = experts[layers[0]][0]
    upcycle = gate_up0.shape[1] == 2 * model.config.intermediate_size
    n_shared = shared[layers[0]][0].shape[0] // (gate_up0.shape[1] // 2) if shared else 0
    pieces = None if upcycle else model.config.intermediate_size // (gate_up0.shape[1] // 2) - n_shared
    config = moe_config(model.config, gate_up0.shape[0], k, layers, upcycle=upcycle, shared=n_shared,
                        parts=None if pieces == gate_up0.shape[0] else pieces)
    dtype = next(model.parameters()).dtype
    moe = runnable(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
    state = model.state_dict()
    dense_ffn = {f"model.layers.{i}.mlp.{name}.weight" for i in layers
                 for name in ("gate_proj", "up_proj", "down_proj")}
    result = moe.load_state_dict({n: t for n, t in state.items() if n not in dense_ffn}, strict=False)
    blocks = {b.layer: b for b in mh.view(moe)}
    unfilled = [n for n in result.missing_keys if not any(f"layers.{i}.mlp." in n for i in layers)]
    if unfilled or result.unexpected_keys or sorted(blocks) != layers:
        raise ConfigError(f"model: converting to {config.model_type} left {unfilled[:3]} unset "
                          f"({result.unexpected_keys[:3]} unused); expected the dense decoder's weights to cover "
                          "everything but the FFNs")
    for i in layers:
        block = blocks[i]
        block.experts.gate_up_proj.copy_(experts[i][0])
        block.experts.down_proj.copy_(experts[i][1])
        router = routers[i].to(block.router.weight)
        scale = 1.0 if max_logit is None else logit_scale(model, i, router, max_logit)
        block.router.weight.copy_(router * scale)
        bias = getattr(block.router, "e_score_correction_bias", None)
        if isinstance(bias, Tensor):
            bias.zero_()
        if block.shared is not None:
            for proj, weight in zip(("gate_proj", "up_proj", "down_proj"), shared[i], strict=True):
                getattr(block.shared, proj).weight.copy_(weight)
        if block.shared_gate is not None:
            block.shared_gate.weight.zero_()
    if getattr(model.config, "tie_word_embeddings", False):
        moe.tie_weights()
    return moe
