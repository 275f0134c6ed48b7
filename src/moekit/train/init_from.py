"""Runs that start from a saved checkpoint (`Recipe.init_from`) instead of a freshly built model, and the LoRA-MoE
a recipe can train on it (`Recipe.lora_moe`).

`init_from: DIR` loads DIR's model (config.json + safetensors, float32) and its tokenizer (tokenizer.json, copied
into the run's tokenizer/) in place of building the recipe's `model` and training a tokenizer; the recipe's
schedule, data and losses apply as usual. `steps: 0` is allowed here: the run saves the checkpoint as it was.

`lora_moe: {adapters: [DIR, ...], rule, k, ...}` then wraps that model with a LoRA-MoE over the saved PEFT
adapters (moekit.compose.lora_moe.LoraMoE.from_adapters: one expert per adapter, the base frozen): only the routers
train (and the variants' own weights; the experts too with `train_experts: true`). The loss is the LM loss plus
`aux_weight` times the rules' auxiliary losses (`LoraMoE.aux_losses()`, read after each forward, each summed over
the layers and logged as `aux_<name>`); nothing is patched. With `domains: [D, ...]` (one per adapter, in order)
the run trains on those domains of moekit.compose.domains and each token's label is its domain's expert
(LoRA-Mixer's specialisation loss); without it, on the recipe's corpus, unlabelled. The finished run's model/ is
what `moekit lora mix` writes (mixture.json: kind, rule, adapters, options, and here the recipe; mixture.safetensors:
routers and experts, no base weights), read back by `moekit.train.trainer.load_run` on the base `init_from`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.files import MAX_JSON_BYTES, atomic_write, read_bounded

# lora_moe keys: the mixture's (LoraMoE.from_adapters), the run's (domains, train_experts, aux_weight)
RULE_KEYS = ("k", "top_p", "min_k", "q", "threshold", "expert")
KIND_KEYS = ("budget", "seq_rank", "seq_alpha")
LORA_MOE_KEYS = ("adapters", "rule", "kind", "modules", "domains", "train_experts", "aux_weight", *RULE_KEYS,
                 *KIND_KEYS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def checkpoint_config(path: str | os.PathLike, field: str = "init_from") -> dict:
    """config.json of the checkpoint directory `path`, checked to hold a string model_type and a tokenizer.json."""
    root = Path(path)
    if not (root / "config.json").is_file() or not (root / "tokenizer.json").is_file():
        raise ConfigError(f"{field}={str(path)!r}: expected a checkpoint directory with config.json and "
                          "tokenizer.json")
    try:
        config = json.loads(read_bounded(root / "config.json", MAX_JSON_BYTES, "config.json", ConfigError))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{root / 'config.json'}: not JSON ({err}); expected a transformers config") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{root / 'config.json'}: expected a transformers config with a string model_type")
    return config


def copy_tokenizer(src: str | os.PathLike, out: Path) -> None:
    """The checkpoint's tokenizer files into out/ (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            atomic_write(out / name, (Path(src) / name).read_text())


def eos_id(tok: Any, init_from: str) -> int:
    """The end-of-text id documents are joined with: the tokenizer's <|endoftext|>, else the config's eos_token_id."""
    from moekit.train.tokenizer import EOS_TOKEN

    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        eos = checkpoint_config(init_from).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if not isinstance(eos, int):
        raise ConfigError(f"init_from={init_from!r}: the tokenizer has no {EOS_TOKEN} and config.json no "
                          "eos_token_id; expected one of them")
    return eos


def train_texts(recipe: Any, seed: int) -> tuple[list[str], list[int] | None]:
    """The training documents and, with lora_moe domains, each document's expert index."""
    domains = (recipe.lora_moe or {}).get("domains")
    if domains:
        from moekit.compose.domains import domain_documents, split_documents

        docs = domain_documents(domains, recipe.max_docs_per_domain, seed=seed)
        texts, labels = [], []
        for i, d in enumerate(domains):
            train = split_documents(docs[d], "train", seed)
            texts += [doc.text for doc in train]
            labels += [i] * len(train)
        return texts, labels
    from moekit.train.corpus import build_corpus

    corpus = build_corpus(recipe.prose_dir, recipe.code_dir, recipe.max_docs_per_domain, seed)
    return list(corpus.texts("train")), None


def token_stream(tok: Any, eos: int, texts: Any, labels: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """Every text's ids followed by eos, as one stream [N]; with labels, each token's document label [N]."""
    ids: list[int] = []
    per_token: list[int] = []
    for i, text in enumerate(texts):
        doc = tok.encode(text).ids
        ids.extend(doc)
        ids.append(eos)
        if labels is not None:
            per_token.extend([labels[i]] * (len(doc) + 1))
    tokens = torch.tensor(ids, dtype=torch.long)
    return tokens, (torch.tensor(per_token, dtype=torch.long) if labels is not None else None)


def load_model(recipe: Any, rt: Any = None) -> nn.Module:
    """The init_from checkpoint in float32 (an MoE family routed through moekit's dispatch and returning its router
    logits, unless a LoRA-MoE goes on it: then its MoE layers stay frozen as they are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.train.trainer import model_type_is_moe

    if rt is not None and rt.world > 1:
        raise ConfigError(f"recipe {recipe.name!r}: init_from runs on one process; expected no torchrun")
    config = AutoConfig.from_pretrained(recipe.init_from)
    moe = model_type_is_moe(config) and recipe.lora_moe is None
    kw = dict(output_router_logits=True, router_aux_loss_coef=recipe.balance_coef) if moe else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.init_from, dtype=torch.float32, use_safetensors=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"init_from={recipe.init_from!r}: cannot load the model ({str(err).splitlines()[0][:200]})"
                          "; expected a transformers causal LM checkpoint") from None
    if moe:
        import moekit.hf as mh

        mh.accelerate(model)
    return model


def attach_lora_moe(model: nn.Module, recipe: Any):
    """The recipe's LoRA-MoE attached to `model` in place, its trainable parameters thawed (the rest frozen)."""
    from moekit.compose.lora_moe import LoraMoE

    spec = recipe.lora_moe
    options = {k: spec[k] for k in (*RULE_KEYS, *KIND_KEYS, "modules") if spec.get(k) is not None}
    mixture = LoraMoE.from_adapters(model, spec["adapters"], router=spec.get("rule", "topk"),
                                    kind=spec.get("kind", "moe"), seed=recipe.seed, **options)
    mixture.thaw(experts=bool(spec.get("train_experts")))
    return mixture


def mixture_losses(mixture: Any, spec: dict) -> tuple[Tensor, dict[str, float]]:
    """The rules' auxiliary losses of the last forward: their sum times the recipe's `aux_weight` (differentiable)
    and each by name."""
    from moekit.compose.mixing import AUX_WEIGHT

    losses = mixture.aux_losses()
    total = sum(losses.values(), torch.zeros(()))
    return spec.get("aux_weight", AUX_WEIGHT) * total, {name: float(v.detach()) for name, v in losses.items()}


def save_mixture(mixture: Any, recipe: Any, path: Path) -> None:
    """model/ of a LoRA-MoE run: what `moekit lora mix` writes, with the recipe in mixture.json."""
    from moekit.train.checkpointing import recipe_json

    mixture.spec = {**mixture.spec, "recipe": recipe_json(recipe)}
    mixture.save(path, force=True)


def load_mixture_run(path: Path) -> nn.Module:
    """The base model of mixture.json's recipe (its init_from) with the saved LoRA-MoE attached, in eval mode."""
    from moekit.compose.lora_moe import LoraMoE
    from moekit.train.trainer import Recipe

    spec = json.loads(read_bounded(path / "mixture.json", MAX_JSON_BYTES, "mixture.json", ConfigError))
    if not isinstance(spec, dict) or not isinstance(spec.get("recipe"), dict):
        raise ConfigError(f"{path / 'mixture.json'}: no recipe; expected the model/ of a moekit train run with "
                          "lora_moe (a `moekit lora mix` output loads with LoraMoE.load on its base)")
    model = load_model(Recipe(**spec["recipe"]))
    LoraMoE.load(model, path)
    return model.eval()
