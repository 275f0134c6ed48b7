"""Module-to-module distillation (m2mKD) of a made MoE from its dense teacher: each MoE block (the student module)
learns to reproduce the teacher's FFN (the teacher module) on the hidden states the teacher itself produces at that
layer (the teacher's context, m2mKD's shared meta model), by mean squared error, one layer at a time. Only the MoE
blocks' parameters move (router, routed and shared experts); attention, norms and embeddings stay as they are.

This is the cheapest repair of a MoEfied model: the per-layer targets need one forward of the teacher, and each
layer trains on its own. The chosen experts' weights depend on the router's scores, so the router learns through
them (with top-k selection itself not differentiable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError


def _mse(block: nn.Module, x: Tensor, target: Tensor, idx: Tensor) -> Tensor:
    """The MoE block's mean squared error to the teacher's FFN outputs on the tokens `idx` of x [N, H]."""
    out = block(x[idx].unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return F.mse_loss(out.squeeze(0), target[idx])


def distill_blocks(student: nn.Module, teacher: nn.Module, windows: Sequence[Tensor], steps: int = 200,
                   lr: float = 1e-3, batch: int = 256, max_tokens: int = 4096, seed: int = 0,
                   held_out: float = 0.1, progress: bool = False) -> list[dict]:
    """Train every MoE block of `student` (a model made from `teacher` by `moefy` / `upcycle`) to output what the
    teacher's FFN of that layer outputs on the teacher's own FFN inputs over the calibration `windows` (ids [L]
    each). In place. Returns per layer {layer, mse_before, mse_after} on the held-out share of the tokens."""
    import moekit.hf as mh
    from moekit.make import capture_inputs, ffn

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected a positive integer")
    family = mh.FAMILIES.get(getattr(student.config, "model_type", None))
    blocks = mh.view(student) if family is not None and family.moe_layers(student.config) else []
    if not blocks:
        raise ConfigError("student: no MoE block; expected a model made by moefy or upcycle")
    layers = [b.layer for b in blocks]
    if teacher.config.num_hidden_layers != student.config.num_hidden_layers:
        raise ConfigError(f"teacher: {teacher.config.num_hidden_layers} layers; expected the student's "
                          f"{student.config.num_hidden_layers}")
    from tqdm import tqdm

    inputs = capture_inputs(teacher, windows, layers, max_tokens)
    g = torch.Generator().manual_seed(seed)
    report = []
    bar = tqdm(total=len(blocks) * steps, desc="make distill", disable=not progress)
    for block in blocks:
        x = inputs[block.layer]
        with torch.no_grad():
            target = ffn(teacher, block.layer)(x)
        order = torch.randperm(x.shape[0], generator=g)
        n_test = max(1, int(held_out * x.shape[0]))
        test, train = order[:n_test], order[n_test:]
        if train.numel() < 1:
            raise ConfigError(f"windows: {x.shape[0]} tokens; expected enough to hold some out")
        module = block.block
        params = [p for p in module.parameters() if p.is_floating_point()]

        with torch.no_grad():
            before = float(_mse(module, x, target, test))
        opt = torch.optim.Adam(params, lr=lr)
        module.train()
        with torch.enable_grad():
            for _ in range(steps):
                idx = train[torch.randint(0, train.numel(), (min(batch, train.numel()),), generator=g)]
                opt.zero_grad()
                _mse(module, x, target, idx).backward()
                opt.step()
                bar.update()
        module.eval()
        with torch.no_grad():
            report.append({"layer": block.layer, "mse_before": before,
                           "mse_after": float(_mse(module, x, target, test))})
        bar.set_postfix(layer=block.layer, mse=f"{report[-1]['mse_after']:.3g}")
    bar.close()
    return report


def distill_checkpoint(model_path: str, teacher_path: str, out: str, steps: int = 200, data: list[str] | None = None,
                       lr: float = 1e-3, batch: int = 256, seq_len: int = 256, max_tokens: int = 4096,
                       seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """`moekit make distill MODEL --teacher DENSE`: the made MoE in `model_path` with its MoE blocks distilled
    (`distill_blocks`) from the dense `teacher_path` on `data` (None: the trainer's corpus) in windows of `seq_len`
    tokens, `max_tokens` in all, written to `out` (atomically) with its tokenizer, plan.json if any, and
    distill.json (the summary returned: per layer held-out MSE before and after)."""
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.compress.run import check_out
    from moekit.files import temp_dir
    from moekit.hf.checkpoint import CheckpointError
    from moekit.make.convert import runnable, target_of
    from moekit.make.finetune import token_stream, training_texts
    from moekit.make.run import dense_config, load_dense, tokenizer_dir

    for name, value, low in (("--steps", steps, 1), ("--batch-size", batch, 1), ("--seq-len", seq_len, 2),
                             ("--max-tokens", max_tokens, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r}: expected an integer >= {low}")
    if not lr > 0:
        raise ConfigError(f"--lr={lr}: expected a positive number")
    source, teacher_dir = Path(model_path), Path(teacher_path)
    student_config = dense_config(source)  # a decoder of a known family with safetensors (dense or MoE)
    teacher_config = dense_config(teacher_dir)
    target_of(teacher_config)  # the teacher must be dense (an MoE is refused, naming it)
    import moekit.hf as mh

    family = mh.FAMILIES.get(student_config.model_type)
    if family is None or not family.moe_layers(student_config):
        raise ConfigError(f"MODEL {source}: a dense {student_config.model_type}; expected an MoE made by `moekit "
                          "make` (the student) and the dense model as --teacher")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(teacher_config, key) != getattr(student_config, key):
            raise ConfigError(f"--teacher {teacher_dir}: {key}={getattr(teacher_config, key)}; expected the "
                              f"student's {getattr(student_config, key)} (the dense model it was made from)")
    out_dir = check_out(out, source, [teacher_dir, *(data or [])], force)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(source))
    tokens = token_stream(tokenizer, training_texts(data))[:max_tokens]
    if tokens.numel() < 2:
        raise ConfigError("data: fewer than 2 tokens; expected some text")
    windows = list(tokens.split(seq_len))
    teacher = load_dense(teacher_dir)
    try:
        student = runnable(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                                use_safetensors=True).eval())
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: could not load the model ({str(err).splitlines()[0]})") from None
    start = time.perf_counter()
    report = distill_blocks(student, teacher, windows, steps=steps, lr=lr, batch=batch, max_tokens=max_tokens,
                            seed=seed, progress=progress)
    summary = {"source": str(source), "teacher": str(teacher_dir), "out": str(out_dir),
               "model_type": student.config.model_type, "steps": steps, "lr": lr, "batch": batch,
               "tokens": int(tokens.numel()), "seconds": round(time.perf_counter() - start, 2), "layers": report}
    with temp_dir(out_dir, "distill") as tmp:
        _write_student(student, source, tmp, out_dir, summary)
    return summary


def _write_student(student: nn.Module, source, tmp, out_dir, summary: dict) -> None:
    """The distilled student, the source's tokenizer and plan.json, and distill.json written in `tmp`, then `tmp`
    swapped in as `out_dir` (an empty `out_dir` removed first)."""
    import json
    import shutil

    from moekit.files import atomic_write, swap_in
    from moekit.make.run import copy_tokenizer

    student.save_pretrained(tmp)
    copy_tokenizer(source, tmp)
    if (source / "plan.json").is_file():
        shutil.copyfile(source / "plan.json", tmp / "plan.json")
    atomic_write(tmp / "distill.json", json.dumps(summary, indent=1))
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    swap_in(tmp, out_dir)


def self_paced_weights(losses: Tensor, step: int, pace_steps: int) -> Tensor:
    """Self-paced weights of D teachers [D] from their current distillation losses (pace `easiest`): the easiest
    teachers first (the ceil(D (step + 1) / pace_steps) with the smallest loss get weight 1, the rest 0), every
    teacher from step pace_steps - 1 on."""
    d = losses.numel()
    count = min(d, max(1, math.ceil(d * (step + 1) / max(1, pace_steps))))
    weights = torch.zeros(d)
    weights[losses.argsort()[:count]] = 1.0
    return weights


def progress_weights(first: Tensor, losses: Tensor) -> Tensor:
    """Self-paced weights of D teachers [D] that follow the student's progress on each (pace `progress`): with
    r_d = L_d(t) / L_d(0), the share of its first loss to teacher d the student still has, w_d = D r_d / sum_d' r_d'
    (mean 1). A teacher the student has caught up with fades; one it lags behind weighs more; equal progress gives
    equal weights."""
    ratio = losses.detach().float() / first.detach().float().clamp_min(1e-12)
    return ratio.numel() * ratio / ratio.sum().clamp_min(1e-12)


PACES = ("progress", "easiest")


def distill_teachers(student: nn.Module, teachers: Sequence[nn.Module], domain_tokens: Sequence[Tensor], settings,
                     temperature: float = 1.0, pace: str = "progress", pace_steps: int | None = None,
                     progress: bool = True, metrics_path=None) -> list[dict]:
    """Multi-teacher distillation into one student (Knowledge Concentration / DOPE's setting: specialists, e.g. the
    BTX branches, distilled into the MoE): each step takes one batch per domain d from `domain_tokens[d]`, the
    loss of teacher d is L_d = T^2 KL(teacher_d || student) of the next-token distributions at temperature T, and
    the step minimises sum_d w_d L_d / sum_d w_d with self-paced weights w: `progress_weights` (pace `progress`:
    each teacher's weight follows the student's progress on it) or `self_paced_weights` (pace `easiest`: easiest
    first, all by `pace_steps`, default half the steps). AdamW on every student parameter at a constant `lr`,
    `settings` a `make.finetune.Finetune` with `steps`. In place; returns one record per step (per-teacher losses
    and weights), appended as JSON lines to `metrics_path` when given."""
    import json
    from dataclasses import replace

    from tqdm import tqdm

    from moekit.make.finetune import window_batch

    if len(teachers) != len(domain_tokens) or not teachers:
        raise ConfigError(f"teachers: {len(teachers)} for {len(domain_tokens)} domains; expected one per domain")
    if not settings.steps:
        raise ConfigError("distill_teachers: expected settings with steps")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature}: expected a positive number")
    if pace not in PACES:
        raise ConfigError(f"pace={pace!r}: expected one of {', '.join(PACES)}")
    pace_len = pace_steps or max(1, settings.steps // 2)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    records = []
    first = None
    student.train()
    for step in tqdm(range(settings.steps), desc="make distill", disable=not progress):
        losses = []
        for d, (teacher, tokens) in enumerate(zip(teachers, domain_tokens, strict=True)):
            batch = window_batch(tokens, replace(settings, seed=settings.seed + d), step)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=batch).logits.float() / temperature, dim=-1)
            pred = F.log_softmax(student(input_ids=batch).logits.float() / temperature, dim=-1)
            kl = F.kl_div(pred.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            losses.append(kl * temperature ** 2)
        stacked = torch.stack(losses)
        first = stacked.detach() if first is None else first
        weights = progress_weights(first, stacked) if pace == "progress" else \
            self_paced_weights(stacked.detach(), step, pace_len)
        loss = (weights * stacked).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), settings.clip)
        opt.step()
        records.append({"step": step + 1, "loss": round(float(loss.detach()), 6),
                        "teacher_losses": [round(float(x), 6) for x in stacked.detach()],
                        "weights": [round(float(w), 6) for w in weights]})
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    student.eval()
    return records


def distill_teachers_checkpoint(model_path: str, teacher_paths: Sequence[str], out: str, settings,
                                data: list[str], pace: str = "progress", temperature: float = 1.0,
                                force: bool = False, progress: bool = True) -> dict:
    """`moekit make distill MODEL --teachers T1 T2 ... --data D1 D2 ...`: the student in `model_path` (any causal LM
    of a known family, typically a BTX / made MoE) distilled from the specialist teachers (`distill_teachers`),
    teacher d on the d-th domain of `data` (one file each, or .jsonl 'domain' labels, in order of appearance), the
    student's tokenizer for every model. Written to `out` (atomically) with the tokenizer, plan.json if any,
    metrics.jsonl and distill.json (the summary returned: first and last loss to each teacher)."""
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.compress.run import check_out
    from moekit.data import read_documents
    from moekit.files import temp_dir
    from moekit.hf.checkpoint import CheckpointError
    from moekit.make.convert import runnable
    from moekit.make.finetune import token_stream
    from moekit.make.run import dense_config, load_dense, tokenizer_dir

    settings.check()
    if not settings.steps or settings.minutes is not None:
        raise ConfigError("make distill --teachers: expected --steps N (no --minutes)")
    if pace not in PACES:
        raise ConfigError(f"--pace={pace!r}: expected one of {', '.join(PACES)}")
    source, teacher_dirs = Path(model_path), [Path(t) for t in teacher_paths]
    if len(teacher_dirs) < 2:
        raise ConfigError(f"--teachers: {len(teacher_dirs)} given; expected at least 2 specialist checkpoints")
    if not data:
        raise ConfigError("--teachers: needs text per teacher; expected --data with one domain per teacher")
    student_config = dense_config(source)
    for t in teacher_dirs:
        vocab = getattr(dense_config(t), "vocab_size", None)
        if vocab != student_config.vocab_size:
            raise ConfigError(f"--teachers {t}: vocab_size={vocab}; expected the student's "
                              f"{student_config.vocab_size} (one tokenizer for all)")
    docs = read_documents(data)
    names = list(dict.fromkeys(str(d.domain) for d in docs))
    if len(names) != len(teacher_dirs):
        raise ConfigError(f"--data: {len(names)} domain(s) ({', '.join(names)}); expected one per teacher "
                          f"({len(teacher_dirs)}), in the teachers' order")
    out_dir = check_out(out, source, [*teacher_dirs, *data], force)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(source))
    tokens = [token_stream(tokenizer, [d.text for d in docs if str(d.domain) == n]) for n in names]
    for name, t in zip(names, tokens, strict=True):
        if t.numel() <= settings.seq_len:
            raise ConfigError(f"--data domain {name!r}: {t.numel()} tokens; expected more than --seq-len="
                              f"{settings.seq_len}")
    teachers = [runnable(load_dense(t)) for t in teacher_dirs]
    try:
        student = runnable(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: could not load the model ({str(err).splitlines()[0]})") from None
    start = time.perf_counter()
    with temp_dir(out_dir, "distill") as tmp:
        records = distill_teachers(student, teachers, tokens, settings, temperature, pace, progress=progress,
                                   metrics_path=tmp / "metrics.jsonl")
        summary = {"source": str(source), "teachers": [str(t) for t in teacher_dirs], "domains": names,
                   "out": str(out_dir), "model_type": student.config.model_type, "steps": len(records),
                   "pace": pace, "lr": settings.lr, "temperature": temperature,
                   "seconds": round(time.perf_counter() - start, 2),
                   "first_losses": records[0]["teacher_losses"], "last_losses": records[-1]["teacher_losses"],
                   "last_weights": records[-1]["weights"]}
        _write_student(student, source, tmp, out_dir, summary)
    return summary
