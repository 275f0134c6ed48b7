"""A BAM model (`make.bam`: attention as a soft mixture of the branches' attentions) as a checkpoint plain
transformers loads with `trust_remote_code=True`.

Layout (`save_bam`, written into a temporary sibling and renamed into place):
  config.json            the MoE family's config (model_type unchanged, so AutoConfig reads it natively) plus
                         `moekit_bam` {experts, share_kv, kv_modules} and `auto_map`
                         {"AutoModelForCausalLM": "modeling_moekit_bam.MoekitBamForCausalLM"}
  moekit.json            {"format": "moekit-bam", "version": 1, "family": model_type, "bam": ..., "plan": ...}
  modeling_moekit_bam.py `MoekitBamForCausalLM`: the family's own causal LM class whose every layer's attention is
                         E attention modules of the layer's own class under a zero-started linear router, the output
                         sum_e softmax(W_r x)_e attn_e(x) (as `make.bam.MixtureOfAttention`); with share_kv the
                         experts hold one key/value module; torch and transformers only
  model.safetensors      the weights as the family's `save_pretrained` writes them (K/V of a shared module repeated
                         under every expert's name)
  tokenizer files of `source` when given
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from moekit.errors import ConfigError

MODELING = "modeling_moekit_bam.py"
MANIFEST = "moekit.json"

MODELING_SOURCE = '''"""A causal LM whose attention is a soft mixture of attention experts (moekit make, BAM; torch and
transformers only)."""

import torch
from torch import nn
from transformers import {base} as Base


class MixtureOfAttention(nn.Module):
    """out = sum_e softmax(W_r x)_e attn_e(x), every expert computed for every token (full-sequence forwards)."""

    def __init__(self, experts, hidden):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden, len(experts), bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        kwargs["past_key_values"] = None
        weights = torch.softmax(self.router(hidden_states).float(), dim=-1).to(hidden_states.dtype)
        out = sum(weights[..., e:e + 1] * expert(hidden_states, *args, **kwargs)[0]
                  for e, expert in enumerate(self.experts))
        return out, None


class MoekitBamForCausalLM(Base):
    def __init__(self, config):
        super().__init__(config)
        bam = config.moekit_bam
        for i, layer in enumerate(self.model.layers):
            first = layer.self_attn
            experts = [first] + [type(first)(config, i) for _ in range(bam["experts"] - 1)]
            if bam["share_kv"]:
                for expert in experts[1:]:
                    for name in bam["kv_modules"]:
                        setattr(expert, name, first.get_submodule(name))
            layer.self_attn = MixtureOfAttention(experts, config.hidden_size)
'''


def bam_settings(model: nn.Module) -> dict:
    """{experts, share_kv, kv_modules} of a BAM model; ConfigError when a layer's attention is not a mixture or
    the layers differ."""
    from moekit.make.bam import MixtureOfAttention, _kv_names

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(isinstance(ly.self_attn, MixtureOfAttention) for ly in layers):
        raise ConfigError("model: not every layer's attention is a mixture; expected a model from make.bam "
                          "(bam or mix_attention)")
    found = set()
    for ly in layers:
        experts = ly.self_attn.experts
        names = _kv_names(experts[0])
        shared = all(e.get_submodule(n) is experts[0].get_submodule(n) for e in experts[1:] for n in names)
        found.add((len(experts), shared, names if shared else ()))
    if len(found) != 1:
        raise ConfigError(f"model: attention mixtures of different shapes {sorted(found)}; expected one per model")
    (experts, shared, names), = found
    return {"experts": experts, "share_kv": shared, "kv_modules": list(names)}


def write_bam(model: nn.Module, directory: Path, plan: dict | None = None) -> None:
    """Write a BAM model's config, weights, modeling file and manifest into the existing `directory`."""
    import transformers

    bam = bam_settings(model)
    base = type(model).__name__
    if getattr(transformers, base, None) is not type(model):
        raise ConfigError(f"model: a {base}; expected a transformers causal LM class (the BTX mix of make.btx)")
    config = model.config
    saved = {k: getattr(config, k, None) for k in ("moekit_bam", "auto_map", "architectures")}
    try:
        config.moekit_bam = bam
        config.auto_map = {"AutoModelForCausalLM": "modeling_moekit_bam.MoekitBamForCausalLM"}
        config.architectures = ["MoekitBamForCausalLM"]
        # clones: a shared K/V module's tensors are stored under every expert's name (safetensors refuses shared
        # memory); loading puts the same values into the one shared module
        model.save_pretrained(directory, state_dict={n: t.detach().clone().contiguous()
                                                     for n, t in model.state_dict().items()})
    finally:
        for key, value in saved.items():
            if value is None and hasattr(config, key):
                delattr(config, key)
            elif value is not None:
                setattr(config, key, value)
    (directory / MODELING).write_text(MODELING_SOURCE.replace("{base}", base))
    (directory / MANIFEST).write_text(json.dumps({"format": "moekit-bam", "version": 1, "family": config.model_type,
                                                  "bam": bam, **({"plan": plan} if plan else {})}))


def save_bam(model: nn.Module, out: str | os.PathLike, source: str | os.PathLike | None = None,
             plan: dict | None = None, force: bool = False) -> Path:
    """Write a BAM model to the new or empty directory `out` (replaced when `force`), with the tokenizer of
    `source` (a checkpoint directory, see `make.run.tokenizer_dir`) when given."""
    from moekit.files import check_output, swap_in, temp_dir
    from moekit.make.run import copy_tokenizer

    bam_settings(model)  # refused before anything is written
    out_dir = check_output(out, [source] if source else [])
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out}: not empty; expected an empty or new directory (or --force)")
    with temp_dir(out_dir, "make-bam") as tmp:
        write_bam(model, tmp, plan)
        if source is not None:
            copy_tokenizer(Path(source), tmp)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        swap_in(tmp, out_dir)
    return out_dir


def load_bam(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The saved BAM model through plain transformers (`AutoModelForCausalLM`, trust_remote_code=True), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
