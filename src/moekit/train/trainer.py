"""A compact trainer for causal LMs whose MLPs are MoE layers (a transformers MoE family, run through moekit's
dispatch): AdamW, warmup + cosine, gradient accumulation, clipping, balance and z losses logged apart, expert load
and router entropy per layer, metrics as JSON lines, safetensors checkpoints, and a resume that continues bit for
bit (the batch of step s depends only on the seed and s; model, optimizer and schedule state are restored).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor
from tqdm import tqdm

from moekit.core.losses import z_loss
from moekit.errors import ConfigError, UnknownNameError
from moekit.train.corpus import build_corpus
from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer


@dataclass(frozen=True)
class Recipe:
    """Everything a run depends on. model: transformers config keywords (with `model_type`)."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    balance_coef: float = 0.01
    z_coef: float = 1e-3
    max_docs_per_domain: int | None = None
    prose_dir: str | None = None  # None: python3.11-doc's sources if installed, else pydoc_data
    code_dir: str | None = None  # None: Python's standard library
    save_every: int = 0
    seed: int = 0


_TINY_MODEL = dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=768, moe_intermediate_size=384,
                   num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                   tie_word_embeddings=True)
# the dense model with the same active FLOPs per token: one MLP as wide as the two chosen experts together
_TINY_DENSE = {**{k: v for k, v in _TINY_MODEL.items() if k not in ("moe_intermediate_size", "num_experts",
                                                                     "num_experts_per_tok", "norm_topk_prob")},
               "model_type": "qwen3", "intermediate_size": 2 * 384}

RECIPES: dict[str, Recipe] = {
    "tiny": Recipe("tiny", _TINY_MODEL, vocab_size=4096, seq_len=256, batch_size=16, steps=700, warmup=60,
                   save_every=100),
    "tiny-dense": Recipe("tiny-dense", _TINY_DENSE, vocab_size=4096, seq_len=256, batch_size=16, steps=700,
                         warmup=60, save_every=100, balance_coef=0.0, z_coef=0.0),
    "smoke": Recipe("smoke", {**_TINY_MODEL, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                              "num_experts": 4, "num_hidden_layers": 2, "head_dim": 8, "max_position_embeddings": 64},
                    vocab_size=300, seq_len=32, batch_size=4, steps=6, warmup=2, grad_accum=2, max_docs_per_domain=20),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UnknownNameError(f"recipe={name!r}: expected one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at the last step (step counts from 0)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_at(tokens: Tensor, recipe: Recipe, step: int, micro: int) -> Tensor:
    """[batch_size, seq_len] windows of the token stream, chosen by (seed, step, micro) alone."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step * 997 + micro)
    starts = torch.randint(0, tokens.numel() - recipe.seq_len, (recipe.batch_size,), generator=g)
    return torch.stack([tokens[s:s + recipe.seq_len] for s in starts.tolist()])


def router_stats(router_logits: tuple[Tensor, ...], k: int) -> tuple[Tensor, list[float], list[float]]:
    """z-loss over all layers, and per layer the load CV and the mean router entropy."""
    z, cvs, entropies = [], [], []
    for logits in router_logits:
        logits = logits.float()
        z.append(z_loss(logits))
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            load = torch.bincount(probs.topk(k, -1).indices.reshape(-1), minlength=probs.shape[-1]).float()
            cvs.append(float(load.std(unbiased=False) / load.mean()))
            entropies.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()))
    return torch.stack(z).mean(), cvs, entropies


def _build_model(recipe: Recipe, vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit.hf as mh

    kw = dict(recipe.model)
    model_type = kw.pop("model_type")
    moe = model_type in mh.FAMILIES
    if moe:
        kw.update(output_router_logits=True, router_aux_loss_coef=recipe.balance_coef)
    config = AutoConfig.for_model(model_type, **kw, vocab_size=vocab_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    return mh.accelerate(model) if moe else model


def _write_checkpoint(out: Path, model, opt: torch.optim.Optimizer, recipe: Recipe, step: int) -> None:
    """checkpoint/ = model.safetensors + optimizer.pt + state.json, replaced atomically."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-"))
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"recipe": asdict(recipe), "step": step}))
    final = out / "checkpoint"
    if final.exists():
        old = out / ".checkpoint-old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _check_out_dir(out: Path, recipe: Recipe, resume: bool) -> int:
    """The step to start from; refuses a non-empty directory without `resume` and another recipe's directory."""
    state_file = out / "checkpoint" / "state.json"
    if resume:
        if not state_file.exists():
            raise ConfigError(f"{out}: expected a training directory with checkpoint/state.json to resume")
        state = json.loads(state_file.read_text())
        saved = state["recipe"]
        if saved != json.loads(json.dumps(asdict(recipe))):
            raise ConfigError(f"{state_file}: recipe {saved.get('name')!r} with other settings; expected recipe "
                              f"{recipe.name!r} as saved to resume it")
        return int(state["step"])
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: directory is not empty; expected a new --out (or --resume to continue it)")
    return 0


def train(recipe: Recipe | str, out_dir: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
          progress: bool = True, **overrides: Any) -> list[dict]:
    """Train `recipe` into out_dir (metrics.jsonl, tokenizer/, checkpoint/, model/ at the end). `stop_at` ends
    early at that step (the schedule still follows `recipe.steps`). Returns the metrics records of this call."""
    import moekit.hf as mh

    recipe = replace(get_recipe(recipe) if isinstance(recipe, str) else recipe, **overrides)
    out = Path(out_dir)
    start = _check_out_dir(out, recipe, resume)
    corpus = build_corpus(recipe.prose_dir, recipe.code_dir, recipe.max_docs_per_domain, recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        tok = load_tokenizer(out / "tokenizer")
    else:
        tok = train_tokenizer(corpus, vocab_size=recipe.vocab_size)
        save_tokenizer(tok, out / "tokenizer", model_max_length=recipe.seq_len)
    eos = tok.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for text in corpus.texts("train"):
        ids.extend(tok.encode(text).ids)
        ids.append(eos)
    tokens = torch.tensor(ids, dtype=torch.long)
    if tokens.numel() <= recipe.seq_len:
        raise ConfigError(f"corpus train split: {tokens.numel()} tokens; expected more than seq_len={recipe.seq_len}")

    model = _build_model(recipe, tok.get_vocab_size())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if resume:
        load_model(model, str(out / "checkpoint" / "model.safetensors"))
        opt.load_state_dict(torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True))
    moe = hasattr(model.config, "num_experts_per_tok")
    k = getattr(model.config, "num_experts_per_tok", 0)
    metrics_path = out / "metrics.jsonl"
    kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start] \
        if resume and metrics_path.exists() else []
    metrics_path.write_text("".join(line + "\n" for line in kept))
    end = min(recipe.steps, stop_at or recipe.steps)
    records = []
    model.train()
    for step in tqdm(range(start, end), desc=f"train {recipe.name}", unit="step", disable=not progress,
                     initial=start, total=end):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step)
        sums = {"loss": 0.0, "lm_loss": 0.0, "balance": 0.0, "z": 0.0}
        for micro in range(recipe.grad_accum):
            batch = batch_at(tokens, recipe, step, micro)
            out_ = model(input_ids=batch, labels=batch)
            if moe:
                z, cvs, entropies = router_stats(out_.router_logits, k)
                balance = out_.aux_loss
            else:
                z = balance = torch.zeros(())
                cvs, entropies = [], []
            loss = out_.loss + recipe.z_coef * z  # out_.loss already holds balance_coef * aux_loss
            (loss / recipe.grad_accum).backward()
            for name, value in (("loss", loss), ("lm_loss", out_.loss - recipe.balance_coef * balance),
                                ("balance", balance), ("z", z)):
                sums[name] += value.item() / recipe.grad_accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        rec = {"step": step + 1, "lr": lr_at(recipe, step), **{n: round(v, 6) for n, v in sums.items()},
               "grad_norm": round(grad_norm, 4), "load_cv": [round(c, 4) for c in cvs],
               "router_entropy": [round(e, 4) for e in entropies],
               "tokens_per_s": round(recipe.batch_size * recipe.seq_len * recipe.grad_accum / seconds, 1)}
        records.append(rec)
        with metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if recipe.save_every and (step + 1) % recipe.save_every == 0:
            _write_checkpoint(out, model, opt, recipe, step + 1)
    _write_checkpoint(out, model, opt, recipe, end)
    if end == recipe.steps:
        if moe:
            mh.restore(model)
            mh.save(model.eval(), out / "model", force=True)
        else:
            model.eval().save_pretrained(out / "model")
    return records
