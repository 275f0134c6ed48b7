"""One decode step of a Llama-shaped MoE decoder without transformers' per-call machinery.

For families whose decoder layer is `x + attn(norm(x))`, then `x + mlp(norm(x))`, with rotary attention through
SDPA (Qwen3-MoE with its per-head q/k norms, Qwen2-MoE, Mixtral), a one-token step of one unpadded sequence is
computed here by calling the model's own modules in the order and with the tensors transformers would use, minus
what a step does not need: the mask builder (SDPA takes no mask for one query), the rotary embedding recomputed
every call (read from a table the same rotary module computed once), keyword plumbing and output records. The
mixture-of-experts block is the model's own module, so `moekit.hf.accelerate` and quantized experts apply.
DeepSeek-V2/V3 have the same layer order with multi-head latent attention in place of q/k/v projections
(`moekit.runtime.decode_lean_mla`). Anything else (padding, sliding windows, rope types other than the default,
other attention implementations or families) takes the model's forward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.runtime.decode_cache import StaticLayer
from moekit.runtime.decode_lean_mla import MLA_FAMILIES, mla_attention, mla_qualifies, mla_rope

GQA_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
LEAN_FAMILIES = GQA_FAMILIES + MLA_FAMILIES
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class LeanStep:
    """`step(token [1, 1], position) -> logits [1, V]` for `model` over `cache` (a `static_cache`)."""

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        self.body = model.model
        attn = self.body.layers[0].self_attn
        if model.config.model_type in MLA_FAMILIES:
            self.rope, self.attend = mla_rope(attn, model.config), mla_attention
        else:
            self.rope, self.attend = sys.modules[type(attn).__module__].apply_rotary_pos_emb, gqa_attention
        embed = self.body.embed_tokens.weight
        positions = torch.arange(max_len, device=embed.device).unsqueeze(0)
        with torch.inference_mode():  # (cos, sin) [1, max_len, d], or DeepSeek-V2's complex [1, max_len, d / 2]
            self.pe = self.body.rotary_emb(embed[:1].unsqueeze(0), position_ids=positions)

    @staticmethod
    def supports(model: nn.Module, cache) -> bool:
        config = model.config
        body = getattr(model, "model", None)
        if config.model_type not in LEAN_FAMILIES or getattr(config, "_attn_implementation", None) != "sdpa":
            return False
        if body is None or getattr(getattr(body, "rotary_emb", None), "rope_type", None) != "default":
            return False
        if not all(type(layer) is StaticLayer for layer in cache.layers) or len(cache.layers) != len(body.layers):
            return False
        if config.model_type in MLA_FAMILIES:
            return mla_qualifies(body)
        # transformers' SDPA path: grouped-query attention through `enable_gqa` when the head dims are equal and at
        # most 256 (else it packs the query heads: numerics this step does not reproduce)
        attn = body.layers[0].self_attn
        if getattr(attn, "head_dim", 0) > 256 or getattr(attn, "num_key_value_groups", 1) < 1:
            return False
        return all(all(hasattr(layer.self_attn, a) for a in _ATTN) and hasattr(layer, "post_attention_layernorm")
                   for layer in body.layers)

    @torch.inference_mode()
    def __call__(self, ids: Tensor, position: int, cache) -> Tensor:
        x = self.body.embed_tokens(ids)  # [1, 1, H]
        pe = tuple(t[:, position:position + 1] for t in self.pe) if isinstance(self.pe, tuple) else \
            self.pe[:, position:position + 1]
        for i, layer in enumerate(self.body.layers):
            x = x + self.attend(layer.self_attn, layer.input_layernorm(x), pe, cache.layers[i], self.rope)
            m = layer.mlp(layer.post_attention_layernorm(x))
            x = x + (m[0] if isinstance(m, tuple) else m)
        return self.model.lm_head(self.body.norm(x)[:, -1])


def gqa_attention(attn: nn.Module, h: Tensor, pe: tuple[Tensor, Tensor], layer_cache, rope) -> Tensor:
    """Rotary grouped-query attention of one token of one row: `h [1, 1, H]` (after the input norm) -> the
    attention's output `[1, 1, H]`, after writing the token's key and value into `layer_cache`."""
    shape = (1, 1, -1, attn.head_dim)
    q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), *pe)
    k, v = layer_cache.update(k, v)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=attn.scaling,
                                       is_causal=False, **gqa)
    o = o.transpose(1, 2).contiguous().reshape(1, 1, -1).contiguous()
    return attn.o_proj(o)
