"""`moekit bench make --lm MODEL`: the language side of issue 17. A dense causal LM (the default model's dense twin,
passed explicitly) MoEfied at 50% and 25% of its FFN neurons active with each partition and router, perplexity
against the dense model without training, after module-to-module distillation of its MoE blocks from the dense
FFNs (`make.distill`, 300 steps per layer), and after a short continued training (`--minutes`, `make.finetune`);
sparse-upcycled (step 0 and after the same training); BTX (one branch per domain of the training text, each
trained 1/D of the same budget, mixed with a hidden-state router, no training after mixing); and BAM (the same
branches, attention too as their soft mixture). Since continued training on the corpus may help the dense model
too, the dense model trained for the same time is the control (`dense+finetune`). `--scratch MODEL` adds an MoE
trained from scratch (the default model) on the same evaluation text when it shares the tokenizer.

Data: calibration and training from `--data` files (every fifth document held out for evaluation) or, without
them, moekit's training corpus (train split) with the default model's held-out test split for evaluation.
Experts: the FFN width I is cut into n = 16 (else 8, 4, 2: the first that divides I) equal parts; families with a
shared expert keep one part as the shared expert (E = n - 1 routed), others route all n; k = fraction x n minus the
shared part. Upcycling: 8 copies (4 in --quick), top-2, router from k-means of the hidden states.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from moekit.bench.timing import environment
from moekit.errors import ConfigError

QUICK_KINDS = (("kmeans", "centroid"), ("kmeans", "learned"))
KINDS = (("random", "centroid"), ("kmeans", "centroid"), ("kmeans", "learned"), ("coactivation", "learned"))


def split_plan(config, fraction: float) -> tuple[int, int, int]:
    """(routed experts E, shared experts, k) for `fraction` of the FFN's neurons active."""
    from moekit.make.convert import default_shared

    width = config.intermediate_size
    parts = next((n for n in (16, 8, 4, 2) if width % n == 0), None)
    if parts is None:
        raise ConfigError(f"--lm: FFN width {width} is odd; expected a width divisible by 2")
    shared = default_shared(config)
    k = max(1, round(fraction * parts) - shared)
    return parts - shared, shared, k


def _data(data: list[str] | None, quick: bool):
    """(training documents, evaluation documents, calibration documents), with their domains."""
    from moekit.data import TextDoc, default_documents, read_documents
    from moekit.train.corpus import build_corpus

    if data:
        docs = read_documents(data)
        if len(docs) < 2:
            raise ConfigError("--data: one document; expected several (every fifth is held out for evaluation)")
        held = [i for i in range(len(docs)) if i % 5 == 4] or [len(docs) - 1]
        train = [d for i, d in enumerate(docs) if i not in held]
        return train, [docs[i] for i in held], train
    corpus = build_corpus(None, None, 60 if quick else 400, 0)
    train = [TextDoc(d.text, d.domain, d.source) for d in corpus.split("train")]
    return train, default_documents(), train[::max(1, len(train) // 200)]


def bench_make_lm(model_path: str, quick: bool = False, minutes: float | None = None, data: list[str] | None = None,
                  scratch: str | None = None, eval_tokens: int | None = None, progress: bool = True,
                  steps: int | None = None, active: tuple[float, ...] = (0.5, 0.25),
                  moefied_only: bool = False) -> list[dict]:
    """`steps` (instead of `minutes`): each continued training runs this many steps (BTX: split over its
    branches), a budget that does not depend on what else the machine runs. `active`: the fractions of FFN
    neurons MoEfied; `moefied_only`: leave out upcycling, the dense control and BTX/BAM."""
    from transformers import AutoTokenizer

    import moekit.make as mk
    from moekit.compress.calibrate import token_windows
    from moekit.eval import perplexity
    from moekit.make.convert import target_of
    from moekit.make.distill import distill_blocks
    from moekit.make.finetune import Finetune, finetune_model, token_stream
    from moekit.make.run import dense_config, load_dense, tokenizer_dir

    if steps is not None and (minutes is not None or isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"--steps={steps!r}: expected a positive integer, without --minutes")
    if not active or any(not 0 < a < 1 for a in active):
        raise ConfigError(f"--active={list(active)}: expected fractions strictly between 0 and 1")
    source = Path(model_path)
    config = dense_config(source)
    target_of(config)  # a dense decoder of a convertible family, else the one-line refusal
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes={minutes}: expected a positive number")
    minutes = (None if quick or steps else 20.0) if minutes is None else minutes
    if steps is not None:
        train_settings = Finetune(steps=steps, batch_size=2 if quick else 8, seq_len=32 if quick else 256)
    elif quick and minutes is None:
        train_settings = Finetune(steps=2, batch_size=2, seq_len=32, warmup=1)
    else:
        train_settings = Finetune(minutes=minutes, batch_size=8, seq_len=256)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(source))
    dense = load_dense(source)
    train_docs, eval_docs, cal_docs = _data(data, quick)
    tokens = token_stream(tok, [d.text for d in train_docs])
    eval_tokens = eval_tokens or (2000 if quick else 30000)
    seq_len = min(256, int(config.max_position_embeddings))

    def ppl(model) -> float:
        return perplexity(model, tok, eval_docs, seq_len=seq_len, max_tokens=eval_tokens, progress=False)["ppl"]

    def trained(model) -> tuple[float, int]:
        records = finetune_model(model, tokens, train_settings, progress=progress)
        return ppl(model), len(records)

    max_cal = 512 if quick else 4096
    windows = token_windows(tok, cal_docs, dense, max_cal)
    layers = list(range(config.num_hidden_layers))
    inputs = mk.capture_inputs(dense, [w for w, _ in windows], layers, max_cal)
    domains = mk.token_domains(windows, max_cal)
    schedule = {"lr": train_settings.lr, "warmup": train_settings.warmup, "decay": train_settings.decay,
                "min_lr_ratio": train_settings.min_lr_ratio}  # make finetune's schedule, recorded with each result
    base = {"bench": "make", "lm": str(source), "model_type": config.model_type, "eval_tokens": eval_tokens,
            "train_schedule": schedule,
            **environment()}
    dense_ppl = ppl(dense)
    records = [{**base, "setting": "dense", "ppl": round(dense_ppl, 4)}]

    def add(setting: str, value: float, **extra) -> None:
        records.append({**base, "setting": setting, **extra, "ppl": round(value, 4),
                        "ppl_over_dense": round(value / dense_ppl, 4)})

    kinds = QUICK_KINDS if quick else KINDS
    for fraction in active:
        experts, shared, k = split_plan(config, fraction)
        best = None
        for partition, router in kinds:
            t0 = time.perf_counter()
            moe, _ = mk.moefy(dense, experts, k, partition, router, inputs=inputs, shared=shared, domains=domains)
            value = ppl(moe)
            add("moefied", value, active=fraction, experts=experts, shared=shared, k=k, partition=partition,
                router=router, make_s=round(time.perf_counter() - t0, 2))
            if best is None or value < best[0]:
                best = (value, moe, partition, router)
        distilled = copy.deepcopy(best[1])
        distill_blocks(distilled, dense, [w for w, _ in windows], steps=5 if quick else 300, max_tokens=max_cal)
        add("moefied+distill", ppl(distilled), active=fraction, experts=experts, shared=shared, k=k,
            partition=best[2], router=best[3], distill_steps=5 if quick else 300)
        value, done = trained(best[1])
        add("moefied+finetune", value, active=fraction, experts=experts, shared=shared, k=k, partition=best[2],
            router=best[3], train_steps=done, train_minutes=minutes)
    if moefied_only:
        if scratch:
            records.append(_scratch(scratch, tok, base, ppl, dense_ppl))
        return records
    copies = 4 if quick else 8
    up, _ = mk.upcycle(dense, copies, 2, "hidden", inputs=inputs)
    add("upcycled", ppl(up), experts=copies, k=2)
    value, done = trained(up)
    add("upcycled+finetune", value, experts=copies, k=2, train_steps=done, train_minutes=minutes)
    value, done = trained(copy.deepcopy(dense))
    add("dense+finetune", value, train_steps=done, train_minutes=minutes)
    fields = _btx(dense, tok, train_docs, train_settings, minutes, quick, ppl)
    if "ppl" in fields:
        bam_ppl = fields.pop("bam_ppl")
        add("btx", fields.pop("ppl"), **fields)
        add("bam", bam_ppl, **fields)
    else:
        records.append({**base, "setting": "btx", **fields})
    if scratch:
        records.append(_scratch(scratch, tok, base, ppl, dense_ppl))
    return records


def _btx(dense, tok, train_docs, settings, minutes: float | None, quick: bool, ppl) -> dict:
    """BTX over the training text's domains, each branch trained 1/D of the budget (2 steps in --quick): the
    record's fields, or a note when the text has a single domain."""
    from dataclasses import replace

    from moekit.compress.calibrate import token_windows
    from moekit.make.bam import mix_attention
    from moekit.make.btx import mix, train_branches
    from moekit.make.finetune import token_stream

    names = list(dict.fromkeys(str(d.domain) for d in train_docs))
    if len(names) < 2:
        return {"note": f"{len(names)} domain in the training text; expected 2 or more"}
    by_domain = [[d for d in train_docs if str(d.domain) == n] for n in names]
    tokens = [token_stream(tok, [d.text for d in ds]) for ds in by_domain]
    windows = [[w for w, _ in token_windows(tok, ds, dense, 512 if quick else 2048)] for ds in by_domain]
    if minutes is not None:
        branch = replace(settings, minutes=minutes / len(names))
    elif settings.steps is not None and settings.steps >= len(names):
        branch = replace(settings, steps=settings.steps // len(names))
    else:
        branch = settings
    branches, steps = train_branches(dense, tokens, branch, progress=False)
    k = 2 if len(names) > 2 else 1
    moe, _ = mix(branches, k, "hidden", windows)
    bam_moe, _ = mix(branches, k, "hidden", windows)
    mix_attention(bam_moe, branches)
    return {"ppl": ppl(moe), "bam_ppl": ppl(bam_moe), "experts": len(names), "k": k, "domains": names,
            "train_steps": sum(steps), "train_minutes": minutes}


def _scratch(path: str, tok, base: dict, ppl, dense_ppl: float) -> dict:
    """The from-scratch MoE on the same evaluation text, when its tokenizer is the dense model's."""
    from transformers import AutoTokenizer

    from moekit.eval import load_model_and_tokenizer
    from moekit.make.run import tokenizer_dir

    _, model, _, _ = load_model_and_tokenizer(path)
    other = AutoTokenizer.from_pretrained(tokenizer_dir(path))
    if other.get_vocab() != tok.get_vocab():
        return {**base, "setting": "scratch", "scratch": path, "note": "different tokenizer; not comparable"}
    value = ppl(model)
    return {**base, "setting": "scratch", "scratch": path, "ppl": round(value, 4),
            "ppl_over_dense": round(value / dense_ppl, 4)}
