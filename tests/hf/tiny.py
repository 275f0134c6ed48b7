"""Tiny random configs for every supported family, built from config (no hub). Odd sizes on purpose: hidden 40
(not a multiple of 64), E = 6 (not a power of two)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILY_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe",
                "gpt_oss")

COMMON = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

PER_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=24, num_local_experts=6),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=20, shared_expert_intermediate_size=28,
                      num_experts=6, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=20, num_experts=6, norm_topk_prob=True,
                      head_dim=10),
    "olmoe": dict(intermediate_size=24, num_experts=6),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=20, n_routed_experts=6, n_shared_experts=2,
                        first_k_dense_replace=1, num_hidden_layers=3, topk_method="group_limited_greedy", n_group=3,
                        topk_group=2, routed_scaling_factor=1.5, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=10, head_dim=8),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=20, n_routed_experts=6, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, n_group=3, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=10, head_dim=8),
    "phimoe": dict(intermediate_size=24, num_local_experts=6),
    "granitemoe": dict(intermediate_size=24, num_local_experts=6),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=6, head_dim=10, sliding_window=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    layer_types=["sliding_attention", "full_attention"]),
}


def tiny_config(model_type: str, **overrides: Any):
    kw = {**COMMON, **PER_FAMILY[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random model in eval mode. Router weights and GPT-OSS's router and expert biases are drawn at a useful
    scale (some families initialise them to zero, which would make every routing a tie); attention biases keep
    their initialisation (at that scale GPT-OSS's o_proj bias added one vector to every token, far above the
    embeddings, and every token routed alike)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "router.bias")) or (".experts." in name
                                                                                    and "bias" in name):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model
