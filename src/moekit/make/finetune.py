"""Continued training of a converted (or any) causal LM checkpoint: `moekit make finetune MODEL --steps N` or
`--minutes M`.

moekit's trainer builds its models from recipes and trains its own tokenizer; a made MoE has a tokenizer and weights
already. This loop reuses the trainer's pieces (its corpus, its batch sampler `batch_at`, the expert-load recorder
and DeepSeek-V3's bias rule from `moekit.train.balance`) around the checkpoint's own model and tokenizer:
AdamW (weight decay 0.1, clipping 1.0), tokens from `--data` files or the trainer's corpus (train split), progress
bar, one JSON line of metrics per step.

Schedule (`scheduled_lr`), with defaults meant for checkpoints that have already converged (continued training of
the dense twin at a constant 3e-4 after 10 warmup steps made it worse, x1.029 perplexity): peak lr 1e-4, a linear
warmup over 10% of the planned steps (`warmup`, None), then a cosine (or linear, `decay`) down to 10% of the peak
(`min_lr_ratio`) at the last planned step. The planned steps are `--steps`; with `--minutes` the first 5 steps are
timed (their warmup provisionally over 50 steps) and the plan is 5 + the time left / the mean time of steps 2-5
(at most `--steps`), so the decay ends when the budget does; the clock still stops a run that falls behind.

Router weights train at lr x min(1, rms(W_r) / 0.01) (`param_groups`): Adam's step is about lr per element whatever
the weight's size, and a MoEfied router is scaled so that its logits stay below 1e-3 (weights of rms ~1e-5); at the
full lr its first step replaced its choice of experts (the dense twin MoEfied at 50% went from x1.66 to x5.4 the
dense perplexity in two steps of `bench make --lm --quick`). An upcycled router (std 0.02) trains at the full lr.

For a family with `e_score_correction_bias` (DeepSeek-V3) the bias moves after each step by DeepSeek-V3's sign rule
(`bias_update_rate`, 0 to switch off). By default (None) the rate is 1e-3 (the default recipe's) capped at a tenth
of the spread of the router's scores on the first batch (the mean over tokens and layers of the std of the sigmoid
scores over the experts): a MoEfied model's router logits are bounded by 1e-3 so that its gates stay at 1, its
scores differ by about 1e-4, and a bias step of 1e-3 would override its choice of experts at the first step. The
result is written like `moekit make` writes: model, tokenizer, metrics.jsonl and finetune.json, through a temporary
sibling renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError

DECAYS = ("cosine", "linear", "none")
PROBE_STEPS = 5  # --minutes: steps timed before the run is planned
PROVISIONAL_WARMUP = 50  # the default warmup's length while the plan is not known yet
ROUTER_RMS = 0.01  # router weights of this rms or more train at the full learning rate


@dataclass(frozen=True)
class Finetune:
    """Settings of a continued training. steps / minutes: whichever ends first (at least one is set)."""

    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-4
    warmup: int | None = None  # None: 10% of the planned steps (see scheduled_lr)
    decay: str = "cosine"  # cosine, linear or none (constant after the warmup)
    min_lr_ratio: float = 0.1
    batch_size: int = 8
    seq_len: int = 256
    weight_decay: float = 0.1
    clip: float = 1.0
    bias_update_rate: float | None = None  # None: min(1e-3, score spread / 10), see the module docstring
    seed: int = 0

    def check(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ConfigError("finetune: expected --steps or --minutes")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ConfigError(f"--steps={self.steps!r}: expected a positive integer")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ConfigError(f"--minutes={self.minutes!r}: expected a finite number above 0")
        for name in ("lr", "clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')}={value!r}: expected a finite number above 0")
        if self.decay not in DECAYS:
            raise ConfigError(f"--decay={self.decay!r}: expected one of {', '.join(DECAYS)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio!r}: expected a fraction in [0, 1]")
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, int)
                                        or self.warmup < 0):
            raise ConfigError(f"--warmup={self.warmup!r}: expected an integer >= 0")
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value!r}: expected a positive integer")
        if self.bias_update_rate is not None and not (math.isfinite(self.bias_update_rate)
                                                      and self.bias_update_rate >= 0):
            raise ConfigError(f"--bias-update-rate={self.bias_update_rate!r}: expected a finite number >= 0")


def token_stream(tokenizer, texts: Sequence[str]) -> Tensor:
    """All texts' token ids, each followed by the tokenizer's EOS where it has one, as one stream [N]."""
    from moekit.data import encode

    ids: list[int] = []
    for text in texts:
        ids.extend(encode(tokenizer, text))
    return torch.tensor(ids, dtype=torch.long)


def training_texts(data: list[str] | None, max_docs_per_domain: int | None = 300) -> list[str]:
    """`data` files' texts, else the trainer's corpus (train split, split as the default recipes split it: corpus
    seed 0, so the default model's held-out documents stay out; `max_docs_per_domain` per domain)."""
    if data:
        from moekit.data import read_documents

        return [d.text for d in read_documents(data)]
    from moekit.train.corpus import build_corpus

    return list(build_corpus(None, None, max_docs_per_domain, 0).texts("train"))


def window_batch(tokens: Tensor, settings: Finetune, step: int) -> Tensor:
    """[batch_size, seq_len] windows of `tokens` for `step`, chosen by (seed, step) alone (the trainer's sampler)."""
    from moekit.train.trainer import Recipe, batch_at

    recipe = Recipe("finetune", seq_len=settings.seq_len, batch_size=settings.batch_size, seed=settings.seed)
    return batch_at(tokens, recipe, step, 0)


def scheduled_lr(settings: Finetune, step: int, planned: int | None) -> float:
    """The learning rate of 0-based `step` of `planned` steps (None: not planned yet): lr (s + 1) / W during the
    warmup of W steps (`settings.warmup`, else 10% of planned, at least 1, else PROVISIONAL_WARMUP), then
    lr (r + (1 - r) f(p)) with r = min_lr_ratio, p = (s + 1 - W) / (planned - W) and f(p) = (1 + cos(pi p)) / 2
    (cosine) or 1 - p (linear): lr * r at the last planned step; constant lr without a plan or with decay none."""
    warmup = settings.warmup if settings.warmup is not None else \
        PROVISIONAL_WARMUP if planned is None else max(1, round(0.1 * planned))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    if planned is None or settings.decay == "none":
        return settings.lr
    p = min(1.0, (step + 1 - warmup) / max(1, planned - warmup))
    f = 0.5 * (1 + math.cos(math.pi * p)) if settings.decay == "cosine" else 1 - p
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * f)


def plan_steps(settings: Finetune, seconds: Sequence[float], elapsed: float) -> int:
    """--minutes: the planned steps after len(seconds) timed steps (each step's seconds, the first left out of the
    mean unless alone) and `elapsed` seconds in all; at most --steps."""
    per_step = sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else seconds[0]
    planned = len(seconds) + int(max(0.0, settings.minutes * 60 - elapsed) / max(per_step, 1e-9))
    return planned if settings.steps is None else min(planned, settings.steps)


def param_groups(model: nn.Module, moe: bool) -> list[dict]:
    """AdamW's parameter groups, each with its `lr_scale`: the MoE blocks' router weights min(1, rms / ROUTER_RMS)
    each, everything else 1."""
    scales: dict[int, float] = {}
    if moe:
        import moekit.hf as mh

        for block in mh.view(model):
            w = block.router.weight
            scales[id(w)] = min(1.0, float(w.detach().float().square().mean().sqrt()) / ROUTER_RMS)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in scales], "lr_scale": 1.0}]
    return groups + [{"params": [p], "lr_scale": scales[id(p)]} for p in params if id(p) in scales]


def score_spread(recorder) -> float:
    """The mean over tokens and layers of the std over the experts of the sigmoid router scores of the last forward
    (a LoadRecorder made with keep_routing=True)."""
    spreads = [float(torch.sigmoid(entry[0].detach().float()).std(dim=-1).mean()) for entry in recorder.last
               if entry is not None]
    return sum(spreads) / len(spreads) if spreads else 0.0


def finetune_model(model: nn.Module, tokens: Tensor, settings: Finetune, progress: bool = True,
                   metrics_path: Path | None = None) -> list[dict]:
    """Train `model` in place on windows of `tokens` [N]; returns one record per step (appended as JSON lines to
    `metrics_path` when given). The model is left in eval mode."""
    from tqdm import tqdm

    from moekit.data import context_length
    from moekit.train.balance import LoadRecorder, correction_biases, load_stats, update_biases
    from moekit.train.trainer import model_type_is_moe

    settings.check()
    if settings.seq_len > context_length(model):
        raise ConfigError(f"--seq-len={settings.seq_len}: expected at most the model's context of "
                          f"{context_length(model)} tokens")
    if tokens.numel() <= settings.seq_len:
        raise ConfigError(f"training text: {tokens.numel()} tokens; expected more than seq_len={settings.seq_len}")
    moe = model_type_is_moe(model.config)
    auto = settings.bias_update_rate is None
    recorder = LoadRecorder(model, keep_routing=auto) if moe else None
    biases = []
    rate = 1e-3 if auto else settings.bias_update_rate
    if moe and rate and all(hasattr(b.router, "e_score_correction_bias") for b in recorder.blocks):
        biases = correction_biases(model)
    opt = torch.optim.AdamW(param_groups(model, moe), lr=settings.lr, weight_decay=settings.weight_decay)
    records: list[dict] = []
    start = time.perf_counter()
    total = settings.steps
    planned = total if settings.minutes is None else None
    step_seconds: list[float] = []
    bar = tqdm(total=total, desc="make finetune", unit="step", disable=not progress)
    model.train()
    try:
        step = 0
        while (planned is None or step < planned) and (total is None or step < total) and (
                settings.minutes is None or time.perf_counter() - start < settings.minutes * 60):
            t0 = time.perf_counter()
            lr = scheduled_lr(settings, step, planned)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            if recorder is not None:
                recorder.reset()
            batch = window_batch(tokens, settings, step)
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise ConfigError(f"step {step + 1}: the loss is {float(loss)}; expected finite losses (lower --lr)")
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "lr": lr, "planned_steps": planned,
                   "loss": round(float(loss.detach()), 6), "grad_norm": round(grad_norm, 4)}
            if recorder is not None:
                rec["load_cv"] = [round(c, 4) for c in load_stats(recorder.counts)["load_cv"]]
                if biases:
                    if auto and step == 0:
                        rate = min(rate, 0.1 * score_spread(recorder))
                    rec["bias_rate"] = rate
                    rec["bias_spread"] = [round(s, 6) for s in update_biases(biases, recorder.counts, rate)]
            seconds = time.perf_counter() - t0
            rec.update(tokens_per_s=round(batch.numel() / seconds, 1),
                       elapsed_s=round(time.perf_counter() - start, 2))
            records.append(rec)
            if metrics_path is not None:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            step += 1
            step_seconds.append(seconds)
            if planned is None and step == PROBE_STEPS:
                planned = plan_steps(settings, step_seconds, time.perf_counter() - start)
                bar.total = planned
                bar.refresh()
    finally:
        bar.close()
        if recorder is not None:
            recorder.close()
        model.eval()
    return records


def finetune_checkpoint(model_path: str, out: str, settings: Finetune, data: list[str] | None = None,
                        force: bool = False, progress: bool = True) -> dict:
    """`moekit make finetune`: the checkpoint in `model_path` (with its tokenizer) trained by `settings` on `data`
    (None: the trainer's corpus), written to `out`. Returns a summary (first and last loss, steps, seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.compress.run import check_out
    from moekit.files import atomic_write, swap_in, temp_dir
    from moekit.hf.checkpoint import CheckpointError
    from moekit.make.convert import runnable
    from moekit.make.mote import read_mote, ternary_training, write_mote
    from moekit.make.run import copy_tokenizer, dense_config, tokenizer_dir

    settings.check()
    source = Path(model_path)
    dense_config(source)  # a decoder of a known family, dense or MoE, with safetensors
    out_dir = check_out(out, source, data or [], force)
    tok_dir = tokenizer_dir(source)
    texts = training_texts(data)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokens = token_stream(tokenizer, texts)
    try:
        model = runnable(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: could not load the model ({str(err).splitlines()[0]})") from None
    mote = read_mote(source)  # a MoTE checkpoint trains its ternary experts straight-through (make.mote)
    with temp_dir(out_dir, "finetune") as tmp:
        with ternary_training(model, source) if mote else contextlib.nullcontext() as latent:
            records = finetune_model(model, tokens, settings, progress, metrics_path=tmp / "metrics.jsonl")
        model.save_pretrained(tmp)
        if mote:
            write_mote(tmp, latent, mote["group_size"], mote.get("init", "copy"))
        copy_tokenizer(source, tmp)
        if (source / "plan.json").is_file():
            shutil.copyfile(source / "plan.json", tmp / "plan.json")
        summary = {"source": str(source), "out": str(out_dir), "model_type": model.config.model_type,
                   "steps": len(records), "planned_steps": records[-1]["planned_steps"] if records else None,
                   "seconds": records[-1]["elapsed_s"] if records else 0.0,
                   "first_loss": records[0]["loss"] if records else None,
                   "last_loss": records[-1]["loss"] if records else None,
                   "tokens": len(records) * settings.batch_size * settings.seq_len,
                   "settings": settings.__dict__}
        atomic_write(tmp / "finetune.json", json.dumps(summary, indent=1))
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        swap_in(tmp, out_dir)
    return summary
