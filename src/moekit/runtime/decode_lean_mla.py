"""Multi-head latent attention (DeepSeek-V2, DeepSeek-V3) for the lean one-token step.

transformers 5.23 keeps MLA's cache compressed: layer i's "keys" are the normed latent `kv_a_layernorm(c_kv)`
`[B, 1, T, kv_lora_rank]` and its "values" the rotated shared rope key `[B, 1, T, qk_rope_head_dim]`. Each forward
writes the new token's latents, then expands the whole cache through `kv_b_proj` (`attn.expand_kv`) into keys
`cat(k_nope, k_rope)` `[B, heads, T, qk_head_dim]` and values `[B, heads, T, v_head_dim]`, and calls SDPA with the
query `cat(q_nope, q_rope)` (q and k dims may differ from v's; SDPA takes them as they are). `mla_attention` does
exactly that for one token of one row with the attention module's own projections, norms, rope function and
`expand_kv`, so the cache it writes is the one transformers writes and the tensors it attends over are the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MLA_FAMILIES = ("deepseek_v3", "deepseek_v2")
_MLA = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "expand_kv", "scaling", "qk_nope_head_dim",
        "qk_rope_head_dim", "kv_lora_rank", "qk_head_dim", "v_head_dim")

Rope = Callable[[Tensor, Tensor, object], tuple[Tensor, Tensor]]


def mla_qualifies(body: nn.Module) -> bool:
    """Whether every layer's attention is transformers' MLA as `mla_attention` reproduces it: the latent and
    rope projections, a query through `q_proj` or `q_a_proj -> q_a_layernorm -> q_b_proj`, and as many key heads as
    query heads (with fewer, transformers' SDPA path packs the query heads against the expanded keys)."""
    for layer in body.layers:
        attn = layer.self_attn
        if not all(hasattr(attn, a) for a in _MLA) or not hasattr(layer, "post_attention_layernorm"):
            return False
        if getattr(attn, "num_key_value_groups", 1) != 1:
            return False
        lora = getattr(attn, "q_lora_rank", None) is not None
        query = ("q_a_proj", "q_a_layernorm", "q_b_proj") if lora else ("q_proj",)
        if not all(getattr(attn, a, None) is not None for a in query):
            return False
    return True


def mla_rope(attn: nn.Module, config) -> Rope:
    """`rope(q_rot, k_rot, pe) -> (q_rot, k_rot)` with the function the attention module's forward applies:
    DeepSeek-V3 `(cos, sin)`, interleaved pairs or halves per `config.rope_interleave`; DeepSeek-V2 complex
    `freqs_cis`."""
    module = sys.modules[type(attn).__module__]
    if config.model_type == "deepseek_v2":
        return lambda q, k, pe: module.apply_rotary_emb(q, k, pe)
    fn = module.apply_rotary_pos_emb_interleave if config.rope_interleave else module.apply_rotary_pos_emb
    return lambda q, k, pe: fn(q, k, *pe)


def mla_attention(attn: nn.Module, h: Tensor, pe, layer_cache, rope: Rope) -> Tensor:
    """One token of one row: `h [1, 1, H]` (after the input norm) -> the attention's output `[1, 1, H]`, after
    writing the token's latents into `layer_cache` (a `StaticLayer`). `pe`: this position's rotary embedding as the
    model's rotary module returns it."""
    q = attn.q_proj(h) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(h)))
    q = q.view(1, 1, -1, attn.qk_head_dim).transpose(1, 2)  # [1, heads, 1, qk_head_dim]
    q_nope, q_rot = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    kv, k_rot = attn.kv_a_proj_with_mqa(h).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    kv = attn.kv_a_layernorm(kv).view(1, 1, 1, attn.kv_lora_rank)  # the latent, one "head"
    k_rot = k_rot.view(1, 1, 1, attn.qk_rope_head_dim)
    q_rot, k_rot = rope(q_rot, k_rot, pe)
    kv, k_rot = layer_cache.update(kv, k_rot)  # the whole prefix: [1, 1, T, kv_lora_rank], [1, 1, T, rope]
    k, v = attn.expand_kv(kv, k_rot)  # [1, heads, T, qk_head_dim], [1, heads, T, v_head_dim]
    q = torch.cat((q_nope, q_rot), dim=-1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=attn.scaling, is_causal=False)
    o = o.reshape(1, -1, 1, v.shape[-1]).transpose(1, 2).contiguous()
    return attn.o_proj(o.reshape(1, 1, -1).contiguous())

