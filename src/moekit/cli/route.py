"""`moekit route fit --router R --data FILE... --out ROUTER.json [--model PATH] [--expert CATEGORY=ADAPTER ...]`
and `moekit route apply ROUTER.json --data FILE... [--model PATH]`: a model-level router (Composition of Experts'
category classifier on TF-IDF or hidden states, or Glider's global router) fitted on labelled documents (.jsonl with
`text` and `domain`), then applied per document; JSON output with the routing accuracy where documents are labelled.
`moekit route apply ROUTER.json --adapter EXPERT=ADAPTER ... [--alpha A] [--k K] [--temperature T]` with Glider's
global router also runs Glider's per-token local routing (Arrow's prototypes) over the adapters and reports each
document's local weights (averaged over tokens and layers); a router fitted with `--gate-steps N --expert C=A ...`
carries Glider's trained gates (ROUTER.gates.safetensors) and its adapters, and `route apply` routes with them.
`moekit route apply P_ADAPTER.safetensors --data FILE... [--model PATH]` reports a P-Adapter's input-dependent
weights over its prompt experts.
`moekit route kshot ADAPTER... --data FILE... [--model PATH] [--m M] [--diversity L]`: K-shot selection of experts
from a pool by their K-shot performance and diversity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.errors import ConfigError

HELP = "route whole documents to expert models or adapters (Composition of Experts, Glider's global router)"


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.compose.model_routing import ROUTERS

    sub = p.add_subparsers(dest="route_command", metavar="COMMAND", required=True)
    fit = sub.add_parser("fit", help="fit a router on labelled documents")
    fit.add_argument("--router", required=True, help=f"one of {', '.join(ROUTERS)}")
    fit.add_argument("--data", action="append", metavar="FILE", required=True,
                     help=".jsonl documents with text and domain (the category)")
    fit.add_argument("--out", required=True, help="router file to write (JSON)")
    fit.add_argument("--model", help="base checkpoint: features for coe-hidden / glider-global, and the model the "
                     "--expert adapters are checked against")
    fit.add_argument("--expert", action="append", metavar="CATEGORY=ADAPTER",
                     help="category-to-expert map entry (default: each category is its own expert)")
    fit.add_argument("--features", choices=("tfidf", "hidden"), default="hidden",
                     help="glider-global: input embeddings (default hidden)")
    fit.add_argument("--representation", choices=("embedding", "hidden"), default="embedding",
                     help="p-adapter: the input's mean input embedding or mean last hidden state (default embedding)")
    fit.add_argument("--prompt-tokens", type=int, default=8, help="p-adapter: prompt length (default 8)")
    fit.add_argument("--steps", type=int, default=100,
                     help="p-adapter: training steps of each prompt expert and of the P-Adapter (default 100)")
    fit.add_argument("--seq-len", type=int, default=64,
                     help="p-adapter, --gate-steps: training window length (default 64)")
    fit.add_argument("--gate-steps", type=int, default=0,
                     help="glider-global: also train Glider's local gates, N steps per expert on its category's "
                     "documents (needs --model and --expert CATEGORY=ADAPTER for every category); written to "
                     "OUT's name + .gates.safetensors and used by route apply (default 0: none)")
    ks = sub.add_parser("kshot", help="select experts from an adapter pool by K-shot performance and diversity")
    ks.add_argument("adapters", metavar="ADAPTER", nargs="*", help="PEFT LoRA adapter directories (the pool)")
    ks.add_argument("--data", action="append", metavar="FILE", required=True, help="the K-shot examples")
    ks.add_argument("--model", help="base checkpoint the adapters were trained on (default: the default model)")
    ks.add_argument("--m", type=int, default=1, help="experts to select (default 1)")
    ks.add_argument("--diversity", type=float, default=0.5,
                    help="weight of the redundancy penalty (max similarity to those picked; default 0.5)")
    ap = sub.add_parser("apply", help="route documents with a fitted router")
    ap.add_argument("router", metavar="ROUTER", help="router file written by moekit route fit (JSON), or a P-Adapter "
                    "(.safetensors written by moekit.compose.p_adapters.save_p_adapter)")
    ap.add_argument("--data", action="append", metavar="FILE", required=True, help=".jsonl or text documents")
    ap.add_argument("--model", help="base checkpoint (needed by hidden-state routers, Glider's local routing and "
                    "P-Adapters)")
    ap.add_argument("--adapter", action="append", metavar="EXPERT=ADAPTER",
                    help="glider-global only: run Glider's per-token local routing over these LoRA experts (one per "
                    "expert of the router)")
    ap.add_argument("--alpha", type=float, default=1.0, help="Glider: weight of the global prior (default 1)")
    ap.add_argument("--k", type=int, default=1, help="Glider: experts per token (default 1)")
    ap.add_argument("--temperature", type=float, default=0.1, help="Glider: softmax temperature (default 0.1)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per document routed (default 256)")


def _expert_map(entries: list[str] | None, model_path: str | None) -> dict[str, str] | None:
    if not entries:
        return None
    from moekit.compose.adapters import check_against_model, load_base, read_adapter

    out = {}
    for entry in entries:
        category, sep, adapter = entry.partition("=")
        if not sep or not category or not adapter:
            raise ConfigError(f"--expert {entry}: expected CATEGORY=ADAPTER_DIR")
        out[category] = adapter
    adapters = [read_adapter(a) for a in out.values()]
    if model_path is not None:
        path, base, _ = load_base(model_path)
        for a in adapters:
            check_against_model(a, base, str(path))
    return out


def _needs_model(name: str, features: str) -> bool:
    return name == "coe-hidden" or (name == "glider-global" and features == "hidden")


def run(args: argparse.Namespace) -> int:
    from moekit.compose.adapters import load_base
    from moekit.compose.model_routing import (
        CompositionOfExperts,
        GliderGlobal,
        RouterError,
        check_router,
        load_router,
        save_router,
    )
    from moekit.data import read_documents
    from moekit.files import check_output

    if args.route_command == "kshot":
        return _kshot(args)
    if args.route_command == "fit":
        check_router(args.router)
        check_output(args.out, args.data, flag="--out", directory=False, error=RouterError)
        docs = read_documents(args.data)
        unlabelled = [d.source for d in docs if d.domain is None]
        if unlabelled:
            raise RouterError(f"{unlabelled[0]}: no domain; expected every training document labelled with its "
                              f"category (a domain field)")
        if args.router == "p-adapter":
            return _fit_p_adapter(args, docs)
        experts = _expert_map(args.expert, args.model)
        model = tokenizer = None
        if _needs_model(args.router, args.features):
            _, model, tokenizer = load_base(args.model)
        texts, labels = [d.text for d in docs], [d.domain for d in docs]
        if args.router.startswith("coe-"):
            router = CompositionOfExperts.fit(texts, labels, experts, args.router.removeprefix("coe-"), model,
                                              tokenizer)
        else:
            by = {c: [t for t, y in zip(texts, labels, strict=True) if y == c] for c in sorted(set(labels))}
            router = GliderGlobal.fit(by, model, tokenizer, args.features)
        if args.gate_steps:
            _fit_glider_gates(args, router, docs, experts)
        save_router(router, args.out, args.data)
        print(json.dumps({"router": args.router, "out": args.out, "documents": len(docs),
                          "categories": sorted(set(labels))}, indent=1))
        return 0
    from moekit.compose.p_adapters import is_p_adapter_file

    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: expected a positive number of tokens")
    if is_p_adapter_file(args.router):
        return _apply_p_adapter(args)
    router = load_router(args.router)
    if args.adapter or getattr(router, "gates", None):
        return _apply_glider_local(args, router)
    docs = read_documents(args.data)
    model = tokenizer = None
    if getattr(router, "features", "") == "hidden":
        _, model, tokenizer = load_base(args.model)
    texts = [d.text for d in docs]
    if isinstance(router, CompositionOfExperts):
        categories = router.categorise(texts, model, tokenizer)
        experts = [router.expert_map[c] for c in categories]
    else:
        categories = experts = router.route(texts, model, tokenizer)
    rows = [{"source": d.source, "category": c, "expert": e, "label": d.domain}
            for d, c, e in zip(docs, categories, experts, strict=True)]
    labelled = [r for r in rows if r["label"] is not None]
    result = {"router": args.router, "documents": len(rows), "routes": rows}
    if labelled:
        result["accuracy"] = sum(r["category"] == r["label"] for r in labelled) / len(labelled)
    print(json.dumps(result, indent=1))
    return 0


def _kshot(args: argparse.Namespace) -> int:
    from moekit.compose.adapters import check_against_model, load_base, read_pool, read_weights
    from moekit.compose.model_routing import adapter_similarity, kshot_nll, kshot_select
    from moekit.data import read_documents

    pool = read_pool(args.adapters)
    if not 1 <= args.m <= len(pool):
        raise ConfigError(f"--m {args.m}: expected 1 <= m <= {len(pool)} (the pool's size)")
    docs = read_documents(args.data)
    path, model, tokenizer = load_base(args.model)
    if tokenizer is None:
        raise ConfigError(f"--model {path}: no tokenizer.json; expected a checkpoint with its tokenizer")
    for adapter in pool:
        check_against_model(adapter, model, str(path))
    nll = kshot_nll(model, tokenizer, args.adapters, [d.text for d in docs])
    sim = adapter_similarity([read_weights(a) for a in args.adapters])
    picked = kshot_select([-x for x in nll], sim, args.m, args.diversity)
    print(json.dumps({"selected": [str(args.adapters[i]) for i in picked], "kshot_examples": len(docs),
                      "nll": {str(a): x for a, x in zip(args.adapters, nll, strict=True)},
                      "similarity": sim.tolist()}, indent=1))
    return 0


def _print_routes(args: argparse.Namespace, kind: str, docs: list, rows: list[dict], extra: dict) -> int:
    rows = [{"source": d.source, **r, "label": d.domain} for d, r in zip(docs, rows, strict=True)]
    labelled = [r for r in rows if r["label"] is not None]
    result = {"router": args.router, "kind": kind, **extra, "documents": len(rows), "routes": rows}
    if labelled:
        result["accuracy"] = sum(r["category"] == r["label"] for r in labelled) / len(labelled)
        if "local_expert" in rows[0]:
            result["local_accuracy"] = sum(r["local_expert"] == r["label"] for r in labelled) / len(labelled)
    print(json.dumps(result, indent=1))
    return 0


def _needs_tokenizer(path, tokenizer) -> None:
    if tokenizer is None:
        raise ConfigError(f"--model {path}: no tokenizer.json; expected a checkpoint with its tokenizer")


def _apply_p_adapter(args: argparse.Namespace) -> int:
    from moekit.compose.adapters import load_base
    from moekit.compose.p_adapters import load_p_adapter
    from moekit.compose.route_apply import p_adapter_rows
    from moekit.data import read_documents

    if args.adapter:
        raise ConfigError(f"--adapter: {args.router} is a P-Adapter; expected --adapter only with a glider-global "
                          f"router")
    adapter = load_p_adapter(args.router)
    docs = read_documents(args.data)
    path, model, tokenizer = load_base(args.model)
    _needs_tokenizer(path, tokenizer)
    rows = p_adapter_rows(adapter, model, tokenizer, [d.text for d in docs], args.max_tokens)
    return _print_routes(args, "p-adapter", docs, rows, {"representation": adapter.representation})


def _apply_glider_local(args: argparse.Namespace, router) -> int:
    from moekit.compose.adapters import check_against_model, load_base, read_adapter
    from moekit.compose.model_routing import GliderGlobal
    from moekit.compose.route_apply import glider_local_rows
    from moekit.data import read_documents

    if not isinstance(router, GliderGlobal):
        raise ConfigError(f"--adapter: {args.router} is a {router.to_json()['router']} router; expected a "
                          f"glider-global router for Glider's local routing")
    adapters, gates = {}, None
    if router.gates is not None:
        if args.adapter:
            raise ConfigError(f"--adapter: {args.router} carries Glider's gates, trained on its own adapters; "
                              "expected no --adapter")
        adapters, gates = dict(router.adapters or {}), Path(args.router).parent / router.gates
    for entry in args.adapter or ():
        expert, sep, adapter = entry.partition("=")
        if not sep or not expert or not adapter:
            raise ConfigError(f"--adapter {entry}: expected EXPERT=ADAPTER_DIR")
        adapters[expert] = adapter
    docs = read_documents(args.data)
    path, model, tokenizer = load_base(args.model)
    _needs_tokenizer(path, tokenizer)
    for a in adapters.values():
        check_against_model(read_adapter(a), model, str(path))
    texts = [d.text for d in docs]
    # the global router embeds with the unadapted base (as at fit time); Glider then changes the model in place
    rows = glider_local_rows(router, model, tokenizer, adapters, texts, args.alpha, args.k, args.temperature,
                             args.max_tokens, model if router.features == "hidden" else None, tokenizer, gates)
    return _print_routes(args, "glider-local", docs, rows, {"alpha": args.alpha, "k": args.k,
                                                             "temperature": args.temperature,
                                                             "local_router": "arrow" if gates is None else "gates"})


def _category_windows(tokenizer, docs: list, seq_len: int) -> dict:
    """{category: full windows [N, seq_len] of its documents}; a category with none is refused."""
    import torch

    from moekit.compose.model_routing import RouterError
    from moekit.data import windows

    by = {}
    for category in sorted({d.domain for d in docs}):
        full = [w.ids for w in windows(tokenizer, [d for d in docs if d.domain == category], seq_len)
                if w.ids.numel() == seq_len]
        if not full:
            raise RouterError(f"category {category!r}: no window of {seq_len} tokens; expected more text or a "
                              f"smaller --seq-len")
        by[category] = torch.stack(full)
    return by


def _fit_glider_gates(args: argparse.Namespace, router, docs: list, experts: dict[str, str] | None) -> None:
    """Glider's local gates: one gate vector per module and expert, trained on the expert's category with the model
    and the adapters frozen; saved beside the router file, which records them and the adapters."""
    from moekit.compose.adapters import load_base, read_weights
    from moekit.compose.glider import Glider, save_gates
    from moekit.files import check_output

    if args.router != "glider-global":
        raise ConfigError(f"--gate-steps: --router {args.router}; expected --router glider-global")
    if args.gate_steps < 0 or args.seq_len < 2:
        raise ConfigError(f"--gate-steps {args.gate_steps}, --seq-len {args.seq_len}: expected steps >= 0 and a "
                          "window of at least 2 tokens")
    if not experts or sorted(experts) != sorted(router.experts):
        raise ConfigError(f"--gate-steps: --expert for {sorted(experts or {})}; expected CATEGORY=ADAPTER for every "
                          f"category ({', '.join(router.experts)})")
    gates_path = Path(args.out).with_name(Path(args.out).stem + ".gates.safetensors")
    check_output(gates_path, args.data, flag="--out (gates)", directory=False)
    path, model, tokenizer = load_base(args.model)
    _needs_tokenizer(path, tokenizer)
    by = _category_windows(tokenizer, docs, args.seq_len)
    glider = Glider(model, [read_weights(experts[e]) for e in router.experts])
    glider.train_gates({i: by[e] for i, e in enumerate(router.experts)}, args.gate_steps)
    save_gates(glider, gates_path, router.experts)
    router.gates, router.adapters = gates_path.name, {e: str(Path(experts[e]).resolve()) for e in router.experts}


def _fit_p_adapter(args: argparse.Namespace, docs: list) -> int:
    """One prompt expert per category (prompt tuning on its documents), then the P-Adapter on every category's
    windows; the base model frozen throughout."""
    import torch

    from moekit.compose.adapters import load_base
    from moekit.compose.model_routing import train_prompt
    from moekit.compose.p_adapters import PAdapter, save_p_adapter, train_p_adapter

    if args.prompt_tokens < 1 or args.steps < 1 or args.seq_len < 2:
        raise ConfigError(f"--prompt-tokens {args.prompt_tokens}, --steps {args.steps}, --seq-len {args.seq_len}: "
                          f"expected positive values (seq-len at least 2)")
    path, model, tokenizer = load_base(args.model)
    _needs_tokenizer(path, tokenizer)
    by = _category_windows(tokenizer, docs, args.seq_len)
    prompts = {c: train_prompt(model, w, args.prompt_tokens, args.steps, desc=f"prompt {c}") for c, w in by.items()}
    adapter = PAdapter(prompts, representation=args.representation)
    summary = train_p_adapter(model, adapter, torch.cat(list(by.values())), args.steps)
    save_p_adapter(adapter, args.out, args.data)
    print(json.dumps({"router": "p-adapter", "out": args.out, "documents": len(docs), "categories": list(by),
                      "windows": {c: int(w.shape[0]) for c, w in by.items()}, "representation": args.representation,
                      "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}, indent=1))
    return 0
