"""The one table of Hugging Face MoE families: where each keeps its MoE blocks, router, experts and shared experts,
how it routes, and which of its layers are dense. transformers 5.23 is the reference; every other module in
`moekit.hf` reads attribute names from here, never hard-codes them.

Every family stores routed experts as transformers v5 does (fused 3D `gate_up_proj` / `down_proj` on an `experts`
module whose forward is `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`), and every
router returns `(logits [T, E], top-k weights [T, k], top-k indices [T, k])`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import ConfigError, UnknownNameError


def _every_layer(config: Any, layer: int) -> bool:  # noqa: ARG001
    return True


def _qwen_sparse(config: Any, layer: int) -> bool:
    """Qwen2/3-MoE: a layer is MoE unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th."""
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer not in mlp_only and config.num_experts > 0 and (layer + 1) % step == 0


def _deepseek_sparse(config: Any, layer: int) -> bool:
    """DeepSeek-V2/V3: the first `first_k_dense_replace` layers are dense."""
    return layer >= (getattr(config, "first_k_dense_replace", 0) or 0)


@dataclass(frozen=True)
class Family:
    """How one transformers family lays out its MoE layers.

    block: attribute of the decoder layer holding the MoE block (dense layers hold an MLP there instead).
    router / experts: attributes of the block. shared / shared_gate: attributes of the shared expert MLP and of
    its sigmoid gate (None where the family has none). routing: the routing rule's name (see `ROUTING_KINDS`).
    experts_key / k_key / width_key: config fields for E, k and the expert width I.
    shared_width: the shared MLP's width from the config (0 when none). activation: moekit Activation kind.
    transposed / bias: GPT-OSS's `[E, H, 2I]` layout with interleaved gate/up and expert biases.
    returns_tuple: the block returns `(hidden, router_scores)` instead of `hidden`.
    checkpoint_experts: regex finding a routed-expert tensor by its name in a checkpoint file, which keeps the
    family's original names (transformers v5 fuses them on load and unfuses them on save; moekit manifest
    checkpoints keep the fused in-memory names); group 1, when it matches, is the expert index of a per-expert
    tensor, otherwise the tensor is fused with E first.
    """

    name: str
    model_type: str
    routing: str
    experts_key: str
    width_key: str
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    k_key: str = "num_experts_per_tok"
    shared_width: Callable[[Any], int] = field(default=lambda config: 0)  # noqa: ARG005
    is_moe_layer: Callable[[Any, int], bool] = _every_layer
    activation: str = "swiglu"
    transposed: bool = False
    bias: bool = False
    returns_tuple: bool = False
    dense_rule: str = "every layer is MoE"
    checkpoint_experts: str = r"\.experts\.(?:(\d+)\.)?"

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.experts_key))

    def k(self, config: Any) -> int:
        return int(getattr(config, self.k_key))

    def width(self, config: Any) -> int:
        return int(getattr(config, self.width_key))

    def moe_layers(self, config: Any) -> list[int]:
        return [i for i in range(config.num_hidden_layers) if self.is_moe_layer(config, i)]

    def routing_options(self, config: Any) -> dict[str, Any]:
        """The config values the routing rule reads, by the config's own field names."""
        keys = ROUTING_KINDS[self.routing][1]
        return {key: getattr(config, key, None) for key in keys}


# routing rule name -> (what it does, the config fields it reads)
ROUTING_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "softmax_topk": ("softmax over E, top-k, renormalised (Mixtral; Qwen/OLMoE when norm_topk_prob)",
                     ("norm_topk_prob",)),
    "softmax_group_topk": ("softmax over E, greedy or group-limited top-k, times routed_scaling_factor (DeepSeek-V2)",
                           ("topk_method", "n_group", "topk_group", "routed_scaling_factor")),
    "sigmoid_group_topk": ("sigmoid, e_score_correction_bias for selection only, n_group/topk_group, normalised, "
                           "times routed_scaling_factor (DeepSeek-V3)",
                           ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")),
    "sparsemixer": ("PhiMoE sparsemixer: top-2 by masked softmax with jitter threshold (argmax in eval)",
                    ("router_jitter_noise", "input_jitter_noise")),
    "topk_softmax": ("top-k logits, then softmax over those k (GraniteMoE; GPT-OSS with a router bias)", ()),
}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Mixtral", "mixtral", "softmax_topk", "num_local_experts", "intermediate_size"),
    Family("Qwen2-MoE", "qwen2_moe", "softmax_topk", "num_experts", "moe_intermediate_size",
           shared="shared_expert", shared_gate="shared_expert_gate",
           shared_width=lambda config: config.shared_expert_intermediate_size, is_moe_layer=_qwen_sparse,
           dense_rule="dense where in mlp_only_layers or (layer + 1) % decoder_sparse_step != 0"),
    Family("Qwen3-MoE", "qwen3_moe", "softmax_topk", "num_experts", "moe_intermediate_size",
           is_moe_layer=_qwen_sparse,
           dense_rule="dense where in mlp_only_layers or (layer + 1) % decoder_sparse_step != 0"),
    Family("OLMoE", "olmoe", "softmax_topk", "num_experts", "intermediate_size"),
    Family("DeepSeek-V2", "deepseek_v2", "softmax_group_topk", "n_routed_experts", "moe_intermediate_size",
           shared="shared_experts",
           shared_width=lambda config: config.moe_intermediate_size * (config.n_shared_experts or 0),
           is_moe_layer=_deepseek_sparse, dense_rule="the first first_k_dense_replace layers are dense"),
    Family("DeepSeek-V3", "deepseek_v3", "sigmoid_group_topk", "n_routed_experts", "moe_intermediate_size",
           shared="shared_experts",
           shared_width=lambda config: config.moe_intermediate_size * (config.n_shared_experts or 0),
           is_moe_layer=_deepseek_sparse, dense_rule="the first first_k_dense_replace layers are dense"),
    Family("PhiMoE", "phimoe", "sparsemixer", "num_local_experts", "intermediate_size", router="router"),
    Family("GraniteMoE", "granitemoe", "topk_softmax", "num_local_experts", "intermediate_size",
           block="block_sparse_moe", router="router", checkpoint_experts=r"\.(?:input_linear|output_linear|experts)\."),
    Family("GPT-OSS", "gpt_oss", "topk_softmax", "num_local_experts", "intermediate_size", router="router",
           activation="gpt_oss", transposed=True, bias=True, returns_tuple=True),
)}


def supported() -> str:
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())


def family_by_type(model_type: object, source: str = "config") -> Family:
    """The family whose `model_type` this is; UnknownNameError naming `source` and listing the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnknownNameError(
            f"{source}: model_type={model_type!r} is not a supported MoE family; expected one of: {supported()}")
    return FAMILIES[model_type]


def family_of(config: Any, source: str = "config") -> Family:
    """The family of a transformers config (or any object with `model_type`), by `config.model_type`.

    Raises UnknownNameError for an architecture not in the table and ConfigError for a dense model of a known
    family (no experts), naming `source` (a file or "config") and listing the supported families.
    """
    family = family_by_type(getattr(config, "model_type", None), source)
    experts = getattr(config, family.experts_key, None)
    if not experts or not family.moe_layers(config):
        raise ConfigError(f"{source}: {family.experts_key}={experts!r} gives a dense {family.name} model with no MoE "
                          f"layer; expected an MoE model of one of: {supported()}")
    return family
