"""`moekit bench routers`: every registered research router trained by one shortened `tiny` recipe, compared.

Each router replaces the tiny model's MoE blocks (`Recipe.moe_layer`) and trains with the same data, seed,
schedule and steps; `ROUTER_SETUPS` sets each one's options so the experts run per token match top-2 (see
docs/routers.md for what is matched and what is not). Per router: held-out loss per domain, mean and distribution
of experts per token and load CV on the held-out windows, and training tokens/s (median over steps; noisy on a
shared machine). Quality numbers are deterministic for a given thread count; tokens/s is not.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# k = 2 of 8 experts in the tiny model; each setup aims at about 2 expert evaluations per token
ROUTER_SETUPS: dict[str, dict[str, Any]] = {
    "topk": {"router": "topk"},
    "top_p": {"router": "top_p", "router_options": {"p": 0.4}},
    "null_experts": {"router": "null_experts", "k": 3, "router_options": {"num_null": 4}},
    "expert_choice": {"router": "expert_choice", "router_options": {"capacity_factor": 1.0}},
    "hash": {"router": "hash"},
    "random": {"router": "random"},
    "smoe_dropout": {"router": "smoe_dropout", "router_options": {"k_start": 1, "k_end": 2}},
    "sinkhorn": {"router": "sinkhorn", "router_options": {"capacity_factor": 1.0}},
    "recurrent": {"router": "recurrent"},
    "chain": {"router": "chain", "k": 1, "router_options": {"iterations": 2}},
    "weak_strong": {"router": "weak_strong"},
    "small_big_skip": {"router": "small_big_skip"},
    "film": {"router": "film"},
}
SLIM_KS = (1, 2, 4, 8)  # SMoE-Dropout evaluated at each k ("self-slimmable")
# the tiny model at half width and half depth (8 experts, top-2 kept): 13 runs fit on 2 shared cores
BENCH_MODEL = dict(hidden_size=128, moe_intermediate_size=192, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def bench_recipe(steps: int, quick: bool):
    """The tiny recipe shortened (`steps`, batch 4 x 64 tokens, 100 documents per domain, vocabulary 2048) on
    the half-size `BENCH_MODEL`; the smoke recipe for `quick`."""
    from moekit.train.trainer import RECIPES

    if quick:
        return dataclasses.replace(RECIPES["smoke"], name="routers-quick", steps=steps, save_every=0)
    tiny = RECIPES["tiny"]
    model = {**tiny.model, **BENCH_MODEL}
    return dataclasses.replace(tiny, name="routers", model=model, vocab_size=2048, steps=steps, batch_size=4,
                               seq_len=64, warmup=max(1, steps // 10), save_every=0, max_docs_per_domain=100)


def heldout_windows(run_dir: Path, recipe, windows: int) -> dict[str, torch.Tensor]:
    """Per domain, up to `windows` windows [n, seq_len] of the corpus's test split, tokenised as the run was."""
    from moekit.train.corpus import build_corpus
    from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer
    from moekit.train.trainer import corpus_seed

    corpus = build_corpus(recipe.prose_dir, recipe.code_dir, recipe.max_docs_per_domain, corpus_seed(recipe))
    tok = load_tokenizer(run_dir / "tokenizer")
    eos = tok.token_to_id(EOS_TOKEN)
    out = {}
    for domain in corpus.domains():
        ids: list[int] = []
        for text in corpus.texts("test", domain):
            ids.extend(tok.encode(text).ids)
            ids.append(eos)
            if len(ids) >= windows * recipe.seq_len:
                break
        n = len(ids) // recipe.seq_len
        if n:
            out[domain] = torch.tensor(ids[:n * recipe.seq_len], dtype=torch.long).view(n, recipe.seq_len)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch: int = 8) -> dict[str, Any]:
    """Held-out loss per domain; experts per token (mean, distribution) and load CV over all MoE layers."""
    from moekit.train.moe_model import moe_blocks

    blocks = moe_blocks(model)
    losses: dict[str, float] = {}
    per_token: list[torch.Tensor] = []
    paths: list[torch.Tensor] = []  # small_big_skip's choice per token: 0 skip, 1 small, 2 big
    counts = [torch.zeros(0) for _ in blocks]
    for domain, windows in data.items():
        total, n = 0.0, 0
        for chunk in windows.split(batch):
            for b in blocks:
                b.token_ids = chunk
            logits = model(input_ids=chunk).logits[:, :-1].float()
            target = chunk[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           reduction="sum"))
            n += target.numel()
            for i, b in enumerate(blocks):
                per_token.append(b.last.routing.experts_per_token().cpu())
                if "path" in b.last.routing.aux:
                    paths.append(b.last.routing.aux["path"].cpu())
                c = b.last.expert_counts.double().cpu()
                counts[i] = c if counts[i].numel() == 0 else counts[i] + c
        losses[domain] = round(total / max(n, 1), 4)
    epT = torch.cat(per_token) if per_token else torch.zeros(0, dtype=torch.long)
    hist = torch.bincount(epT.long()) if epT.numel() else torch.zeros(1)
    cvs = [float(c.std(unbiased=False) / c.mean().clamp_min(1e-12)) for c in counts]
    return {"loss": losses,
            "experts_per_token": round(float(epT.float().mean()), 3) if epT.numel() else None,
            "experts_per_token_dist": {str(i): round(float(v) / max(epT.numel(), 1), 4) for i, v in enumerate(hist)
                                       if v},
            "load_cv": round(statistics.mean(cvs), 4) if cvs else None,
            **({"paths": {name: round(float(v) / torch.cat(paths).numel(), 4) for name, v in
                          zip(("skip", "small", "big"), torch.bincount(torch.cat(paths), minlength=3), strict=True)}}
               if paths else {})}


def _slim_losses(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """SMoE-Dropout at each k of SLIM_KS (the layers' default k set for the call, then put back)."""
    from moekit.train.moe_model import moe_blocks

    routers = [b.moe.router for b in moe_blocks(model)]
    default = [r.k for r in routers]
    out = {}
    try:
        for k in SLIM_KS:
            if k > routers[0].num_experts:
                continue
            for r in routers:
                r.k = k
            out[str(k)] = evaluate(model, data)["loss"]
    finally:
        for r, k in zip(routers, default, strict=True):
            r.k = k
    return out


def bench_one(name: str, recipe, work: Path, windows: int) -> dict[str, Any]:
    from moekit.train.trainer import load_run, train

    setup = ROUTER_SETUPS[name]
    run_dir = work / name
    records = train(dataclasses.replace(recipe, moe_layer=setup), run_dir, progress=False)
    model = load_run(run_dir)
    data = heldout_windows(run_dir, recipe, windows)
    result = {"router": name, "setup": setup, "steps": recipe.steps, "seed": recipe.seed, **evaluate(model, data)}
    speeds = [r["tokens_per_s"] for r in records[min(3, len(records) - 1):]]
    result["train_tokens_per_s"] = round(statistics.median(speeds), 1)
    result["final_train_loss"] = records[-1]["lm_loss"]
    if name == "smoe_dropout":
        result["loss_at_k"] = _slim_losses(model, data)
    return result


def bench_routers(names: list[str] | None = None, steps: int = 300, quick: bool = False,
                  windows: int = 32, out_dir: str | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Train and evaluate each router of `names` (default: all of ROUTER_SETUPS); one record per router. `seed`
    replaces the recipe's initialisation and batch order; the corpus and its split stay those of seed 0, so every
    seed is scored on the same held-out text."""
    from moekit.errors import ConfigError

    names = names or list(ROUTER_SETUPS)
    unknown = [n for n in names if n not in ROUTER_SETUPS]
    if unknown:
        raise ConfigError(f"--router {', '.join(unknown)}: expected some of {', '.join(ROUTER_SETUPS)}")
    if steps < 1:
        raise ConfigError(f"--steps={steps}: expected a positive integer")
    recipe = dataclasses.replace(bench_recipe(steps, quick), seed=seed, data_seed=0)
    results = []
    with tempfile.TemporaryDirectory(prefix="moekit-bench-routers-", dir=out_dir) as tmp:
        for name in tqdm(names, desc="bench routers", unit="router"):
            results.append(bench_one(name, recipe, Path(tmp), windows if not quick else 2))
    base = next((r for r in results if r["router"] == "topk"), None)
    if base is not None:
        for r in results:
            r["loss_minus_topk"] = {d: round(v - base["loss"][d], 4) for d, v in r["loss"].items()}
    return results


def table_rows(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records flattened for a text table, and its columns."""
    domains = sorted({d for r in records for d in r["loss"]})
    rows = [{"router": r["router"], **{f"loss_{d}": r["loss"].get(d) for d in domains},
             "experts_per_token": r["experts_per_token"], "load_cv": r["load_cv"],
             "train_tokens_per_s": r["train_tokens_per_s"]} for r in records]
    return rows, ["router", *(f"loss_{d}" for d in domains), "experts_per_token", "load_cv", "train_tokens_per_s"]


# inference-time changes on moekit-tiny: (label, reroute keywords)
REROUTES: list[tuple[str, dict[str, Any]]] = [
    ("as trained", {}), ("k=1", {"k": 1}), ("k=3", {"k": 3}), ("k=4", {"k": 4}),
    ("top_p=0.5", {"top_p": 0.5}), ("top_p=0.7", {"top_p": 0.7}), ("top_p=0.9", {"top_p": 0.9}),
    ("skip<0.3", {"skip_threshold": 0.3}), ("skip<0.5", {"skip_threshold": 0.5}),
    ("skip<0.7", {"skip_threshold": 0.7}),
]
SCMOE = {"beta": 0.5, "weak_rank": 2, "alpha": 0.1}


@torch.no_grad()
def bench_reroute(max_tokens: int = 8192, seq_len: int = 256) -> list[dict[str, Any]]:
    """moekit-tiny under each of REROUTES (`moekit.hf.reroute`) and SCMoE decoding: held-out loss and greedy
    next-token accuracy per domain, mean experts per token over the MoE layers."""
    from moekit.data import default_documents, windows
    from moekit.default import default_model, default_tokenizer
    from moekit.hf.reroute import experts_per_token, reroute, scmoe_logits, unroute

    model, tok = default_model(), default_tokenizer()
    docs = default_documents()
    data = {d: windows(tok, [doc for doc in docs if doc.domain == d], seq_len, max_tokens)
            for d in sorted({doc.domain for doc in docs})}

    def score(logits_of) -> tuple[dict[str, float], dict[str, float]]:
        loss, acc = {}, {}
        for domain, wins in data.items():
            total, hits, n = 0.0, 0, 0
            for w in wins:
                if w.ids.numel() < 2:
                    continue
                ids = w.ids.unsqueeze(0)
                logits = logits_of(ids)[0, :-1].float()
                target = ids[0, 1:]
                total += float(F.cross_entropy(torch.log_softmax(logits, -1).clamp_min(-1e4), target,
                                               reduction="sum"))
                hits += int((logits.argmax(-1) == target).sum())
                n += target.numel()
            loss[domain], acc[domain] = round(total / n, 4), round(hits / n, 4)
        return loss, acc

    rows = []
    for label, change in tqdm(REROUTES, desc="bench reroute", unit="setting"):
        if change:
            reroute(model, **change)
        loss, acc = score(lambda ids: model(ids).logits)
        per_layer = experts_per_token(model)
        trained_k = float(model.config.num_experts_per_tok)
        mean = statistics.mean(per_layer) if change and None not in per_layer else trained_k
        rows.append({"setting": label, "change": change, "loss": loss, "accuracy": acc,
                     "experts_per_token": round(mean, 3)})
        unroute(model)
    _, acc = score(lambda ids: scmoe_logits(model, ids, **SCMOE))
    k = model.config.num_experts_per_tok
    rows.append({"setting": f"SCMoE (top-{k} vs rank-2)", "change": SCMOE, "loss": None, "accuracy": acc,
                 "experts_per_token": k + 1.0})
    return rows
