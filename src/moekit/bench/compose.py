"""`moekit bench compose`: LoRA experts on the four domains of moekit.compose.domains, routed and merged.

Per domain, held-out perplexity (the test split, scored one document at a time) of: the base model; each single
domain LoRA; each LoRA-MoE rule over the four LoRAs (moekit.compose.lora_moe, routers trained briefly on the
domains' training text); each model-level router (CoE on TF-IDF and on hidden states, Glider, K-shot selection,
P-Adapters' prompt experts, all choosing per document, and the input-conditioned P-Adapter mixing the prompt experts
per document); each merge (exact sum, PEFT linear / ties / dare_linear / svd, Orthogonal Adaptation's sum of
orthogonally trained LoRAs, composed sparse fine-tunings); ComPEFT of each LoRA's update at 10% and 5% density with
the least-squares scale and with the paper's alpha * std (alpha chosen on validation windows). With routing
accuracy by document, active parameters per token and tokens/s; the last record holds the issue's targets as
booleans beside the measured values. Quality, not speed: tokens/s is indicative only.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moekit.bench.compose_eval import (
    EvalDocs,
    accuracy,
    active_base_params,
    adapter_params,
    mixture_target,
    ppl_by_domain,
    score_docs,
    tokens_per_s,
)
from moekit.bench.timing import environment
from moekit.compose.adapters import AdapterError, load_base, read_adapter

FULL = dict(steps=200, rank=8, seq_len=128, batch_size=8, eval_docs=24, eval_windows=4, train_docs=64, kshot=4,
            router_steps=100, prompt_steps=100, prompt_tokens=8, sft_steps=50, sft_density=0.01, valid_windows=8)
QUICK = dict(steps=2, rank=2, seq_len=32, batch_size=2, eval_docs=2, eval_windows=1, train_docs=4, kshot=1,
             router_steps=2, prompt_steps=2, prompt_tokens=2, sft_steps=1, sft_density=0.01, valid_windows=1)
MOE_RULES = ("topk", "dynmole", "mixer", "soft")
MERGES = ("sum", "linear", "ties", "dare_linear", "svd")
COLUMNS = ["setting", "ppl_mean", "routing_accuracy", "active_params", "tokens_per_s"]


def bench_compose(model_path: str | None = None, adapters_dir: str | None = None, quick: bool = False,
                  domains: tuple[str, ...] | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    from moekit.compose.domains import DOMAINS, domain_documents, split_documents, token_windows
    from moekit.compose.lora import attention_targets

    cfg = QUICK if quick else FULL
    domains = tuple(domains or DOMAINS)
    path, model, tokenizer = load_base(model_path)
    if tokenizer is None:
        raise AdapterError(f"--model {path}: no tokenizer.json; expected a checkpoint with its tokenizer")
    adapters = _adapter_dirs(adapters_dir, domains)
    torch.manual_seed(seed)
    docs = domain_documents(domains, seed=seed)
    split = {s: {d: split_documents(docs[d], s, seed) for d in domains} for s in ("train", "validation", "test")}
    evald = EvalDocs.build(tokenizer, {d: [x.text for x in split["test"][d][:cfg["eval_docs"]]] for d in domains},
                           cfg["seq_len"], cfg["eval_windows"])
    train = {d: token_windows(tokenizer, split["train"][d], cfg["seq_len"], cfg["steps"] * cfg["batch_size"])
             for d in domains}
    valid = {d: token_windows(tokenizer, split["validation"][d] or split["train"][d][-4:], cfg["seq_len"],
                              cfg["valid_windows"]) for d in domains}  # ComPEFT's alpha is chosen on these
    env = {"bench": "compose", "model": str(path), "quick": quick, "eval_tokens": evald.tokens(), **cfg,
           **environment()}
    base_active = active_base_params(model)
    records: list[dict] = []

    def record(setting: str, scores, acc=None, active=base_active, extra_seconds=0.0, **more) -> dict:
        ppl = ppl_by_domain(scores)
        rec = {"setting": setting, "ppl": ppl, "ppl_mean": sum(ppl.values()) / len(ppl), "routing_accuracy": acc,
               "active_params": int(active), "tokens_per_s": tokens_per_s(scores, extra_seconds), **more, **env}
        records.append(rec)
        return rec

    record("base", score_docs(model, evald, "base", progress))
    targets = attention_targets(model)
    with tempfile.TemporaryDirectory(prefix="moekit-bench-compose-") as tmp:
        tmp = Path(tmp)
        if adapters is None:
            adapters = _train_loras(model, train, tmp, cfg, targets, seed, progress)
        pool = {d: read_adapter(adapters[d]) for d in domains}
        lora_size = adapter_params(pool[domains[0]].tensors)
        single = {d: _with_adapter(model, adapters[d], lambda m, d=d: score_docs(m, evald, f"lora {d}", progress))
                  for d in domains}
        for d in domains:
            record(f"lora:{d}", single[d], active=base_active + lora_size)
        oracle = {d: ppl_by_domain(single[d])[d] for d in domains}
        singles = {d: ppl_by_domain(single[d]) for d in domains}
        mixtures = {}
        for rule in MOE_RULES:
            rec = _lora_moe(model, adapters, domains, train, evald, rule, cfg, seed, progress, base_active, lora_size)
            records.append({**rec, **env})
            mixtures[rec["setting"]] = rec["ppl"]
        from moekit.bench.compose_routers import model_level_routers

        for rec in model_level_routers(model, tokenizer, adapters, single, split, evald, train, domains, cfg,
                                       seed, progress, base_active, lora_size):
            records.append({**rec, **env})
            mixtures[rec["setting"]] = rec["ppl"]
        from moekit.bench.compose_merges import merges

        merged = merges(model, pool, single, evald, train, domains, cfg, targets, seed, progress,
                        base_active, tmp, valid)
        records += [{**rec, **env} for rec in merged]
    route_acc = {r["setting"]: r["routing_accuracy"] for r in records
                 if r["setting"].startswith("route:") and r["routing_accuracy"] is not None}
    ortho = next(r for r in records if r["setting"] == "merge:orthogonal")
    plain = next(r for r in records if r["setting"] == "merge:sum")
    compeft = [r for r in records if r["setting"].startswith("compeft:")]
    records.append({"setting": "targets", **env,
                    "mixture": mixture_target(mixtures, oracle, singles),
                    "routing": {"target": "model-level routing accuracy >= 90% by document", "measured": route_acc,
                                "met": any(v >= 0.9 for v in route_acc.values())},
                    "orthogonal": {"target": "orthogonal adapters summed: each domain within 3% of its own adapter",
                                   "max_excess": ortho["max_excess_over_own"], "plain_sum_max_excess":
                                   plain["max_excess_over_own"], "met": ortho["max_excess_over_own"] <= 0.03},
                    "compeft": {"target": ">= 8x smaller within 1% perplexity",
                                "measured": {r["setting"]: {"ratio": r["compression_ratio"],
                                                            "max_excess": r["max_excess_over_own"]} for r in compeft},
                                "met": any(r["compression_ratio"] >= 8 and r["max_excess_over_own"] <= 0.01
                                           for r in compeft)}})
    return records


def _adapter_dirs(adapters_dir: str | None, domains) -> dict[str, Path] | None:
    if adapters_dir is None:
        return None
    root = Path(adapters_dir)
    missing = [d for d in domains if not (root / d / "adapter_config.json").is_file()]
    if missing:
        raise AdapterError(f"--adapters {root}: no adapter for domain {missing[0]!r}; expected {root}/<domain>/ "
                           f"(as moekit lora train --out writes) for each of {', '.join(domains)}")
    return {d: root / d for d in domains}


def _train_loras(model, train, tmp: Path, cfg: dict, targets, seed: int, progress: bool) -> dict[str, Path]:
    from moekit.compose.lora import train_domain_lora

    out = {}
    for d, windows in train.items():
        out[d] = tmp / "lora" / d
        train_domain_lora(model, d, out[d], cfg["steps"], windows=windows, rank=cfg["rank"], alpha=2 * cfg["rank"],
                          batch_size=cfg["batch_size"], target_modules=targets, seed=seed, progress=progress)
    return out


def _with_adapter(model, adapter_dir, fn):
    """fn(PEFT model with `adapter_dir` loaded), then the model unwrapped again."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    try:
        return fn(peft_model)
    finally:
        peft_model.unload()


def _lora_moe(model, adapters, domains, train, evald, rule, cfg, seed, progress, base_active, lora_size) -> dict:
    from moekit.compose.loop import fit
    from moekit.compose.lora_moe import LoraMoE

    moe = LoraMoE.from_adapters(model, [adapters[d] for d in domains], router=rule, seed=seed)
    try:
        windows = torch.cat([train[d] for d in domains])
        labels = torch.cat([torch.full((train[d].shape[0],), i) for i, d in enumerate(domains)])
        params = moe.thaw()
        started = time.perf_counter()
        fit(model, windows, params, cfg["router_steps"], 1e-3, cfg["batch_size"], seed, aux=moe.aux_loss,
            aux_weight=0.01, labels=labels, on_batch=moe.set_labels, progress=progress, desc=f"lora-moe {rule}")
        train_seconds = time.perf_counter() - started
        layers = moe._moe_layers()
        per_doc: dict[str, list[int]] = {d: [] for d in domains}
        active: list[float] = []

        def after(domain: str, _i: int) -> None:
            w = torch.stack([m.weights.mean(0) for m in layers]).mean(0)
            per_doc[domain].append(int(w.argmax()))
            active.append(float(np.mean([(m.weights > 0).float().sum(-1).mean() for m in layers])))

        scores = score_docs(model, evald, f"lora-moe {rule}", progress, after_doc=after)
        router_params = sum(p.numel() for p in params)
    finally:
        moe.detach()
    choice = {d: [domains[i] for i in per_doc[d]] for d in domains}
    ppl = ppl_by_domain(scores)
    experts_per_token = float(np.mean(active)) if active else float("nan")
    return {"setting": f"lora-moe:{rule}", "ppl": ppl, "ppl_mean": sum(ppl.values()) / len(ppl),
            "routing_accuracy": accuracy(choice, {d: d for d in domains}),
            "active_params": int(base_active + experts_per_token * lora_size + router_params),
            "experts_per_token": experts_per_token, "tokens_per_s": tokens_per_s(scores),
            "router_train_seconds": round(train_seconds, 2)}


def add_arguments(p) -> None:
    p.add_argument("--model", help="base checkpoint (default: the default model; its dense twin works too)")
    p.add_argument("--adapters", metavar="DIR", help="use DIR/<domain> adapters (moekit lora train) instead of "
                   "training the domain LoRAs here")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--quick", action="store_true", help="2-step trainings, 2 documents per domain: a smoke run")
    p.add_argument("--domain", action="append", help="run only these domains (repeatable; default all four)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import json

    from moekit.cli.bench import format_table

    records = bench_compose(args.model, args.adapters, args.quick, tuple(args.domain) if args.domain else None,
                            args.seed)
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in COLUMNS}
            for r in records[:-1]]
    print(json.dumps(records, indent=1) if args.json else
          format_table(rows, COLUMNS) + "\n" + json.dumps({k: v for k, v in records[-1].items()
                                                            if k in ("mixture", "routing", "orthogonal", "compeft")},
                                                           indent=1))
    return 0
