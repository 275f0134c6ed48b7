"""BAM (Branch-Attend-Mix): BTX that upcycles attention too. Every layer's attention becomes a soft mixture of the
branches' attention modules: out = sum_e softmax(W_r x)_e attn_e(x), all experts computed for every token, router
W_r [E, H] started at zero (equal weights, so with untrained branches the model is the dense one). With `share_kv`
the experts share one key/value projection (the branches' average): BAM's KV-sharing variant, fewer parameters and
one KV cache's worth of keys and values per layer.

No native transformers family has attention experts: the mixture is trained (`make.finetune.finetune_model`) and
evaluated in memory, and saved with moekit's manifest and modeling file for `trust_remote_code=True`
(`make.bam_save`, `moekit make --method bam`). It runs full-sequence forwards (training, perplexity): `use_cache` is
switched off, since the experts would each write the layer's KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError

# per attention layout, the submodules holding keys and values (shared with share_kv)
KV_MODULES = (("k_proj", "k_norm", "v_proj"), ("k_proj", "v_proj"),
              ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"))


class MixtureOfAttention(nn.Module):
    """A soft mixture of attention modules of one family (same call signature as each of them)."""

    def __init__(self, experts: Sequence[nn.Module], hidden: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden, len(experts), bias=False)
        nn.init.zeros_(self.router.weight)
        self.last_weights: Tensor | None = None

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        kwargs["past_key_values"] = None  # full-sequence forwards only (see the module docstring)
        weights = torch.softmax(self.router(hidden_states).float(), dim=-1).to(hidden_states.dtype)  # [B, T, E]
        self.last_weights = weights.detach()
        out = sum(weights[..., e:e + 1] * expert(hidden_states, *args, **kwargs)[0]
                  for e, expert in enumerate(self.experts))
        return out, None


def _kv_names(attn: nn.Module) -> tuple[str, ...]:
    for names in KV_MODULES:
        if all(hasattr(attn, n) for n in names):
            return names
    raise ConfigError(f"share_kv: {type(attn).__name__} has none of the key/value layouts "
                      f"{', '.join('/'.join(n) for n in KV_MODULES)}; expected share_kv=False")


@torch.no_grad()
def mix_attention(moe: nn.Module, branches: Sequence[nn.Module], share_kv: bool = False) -> nn.Module:
    """Put a MixtureOfAttention of the branches' attention modules into every layer of `moe` (the BTX mix of the
    same branches, or any model of the same architecture), in place; returns `moe`."""
    layers = moe.model.layers
    if len(branches) < 2 or any(len(b.model.layers) != len(layers) for b in branches):
        raise ConfigError(f"bam: {len(branches)} branches; expected at least 2 copies of the model")
    for i, layer in enumerate(layers):
        experts = [copy.deepcopy(b.model.layers[i].self_attn) for b in branches]
        if share_kv:
            for name in _kv_names(experts[0]):
                shared = experts[0].get_submodule(name)
                for key, value in shared.state_dict().items():
                    value.copy_(torch.stack([e.get_submodule(name).state_dict()[key] for e in experts]).mean(0))
                for e in experts[1:]:
                    setattr(e, name, shared)
        layer.self_attn = MixtureOfAttention(experts, moe.config.hidden_size).to(
            next(layer.parameters()).dtype)
    moe.config.use_cache = False
    return moe


def bam(model: nn.Module, domain_tokens: Sequence[Tensor], k: int, settings, router: str = "hidden",
        windows: Sequence[Sequence[Tensor]] | None = None, share_kv: bool = False, seed: int = 0,
        progress: bool = True) -> tuple[nn.Module, dict]:
    """BTX (`make.btx`: branches trained per domain, their FFNs the experts) whose attention is also a soft
    mixture of the branches' attentions. Returns the in-memory model and its plan."""
    from moekit.make.btx import mix, train_branches

    branches, steps = train_branches(model, domain_tokens, settings, progress)
    moe, plan = mix(branches, k, router, windows, seed)
    mix_attention(moe, branches, share_kv)
    plan.update(partition="bam", share_kv=share_kv, branch_steps=steps)
    return moe, plan
