"""`moekit route fit --router R --data FILE... --out ROUTER.json [--model PATH] [--expert CATEGORY=ADAPTER ...]`
and `moekit route apply ROUTER.json --data FILE... [--model PATH]`: a model-level router (Composition of Experts'
category classifier on TF-IDF or hidden states, or Glider's global router) fitted on labelled documents (.jsonl with
`text` and `domain`), then applied per document; JSON output with the routing accuracy where documents are labelled.
"""

from __future__ import annotations

import argparse
import json

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
    ap = sub.add_parser("apply", help="route documents with a fitted router")
    ap.add_argument("router", metavar="ROUTER", help="router file written by moekit route fit")
    ap.add_argument("--data", action="append", metavar="FILE", required=True, help=".jsonl or text documents")
    ap.add_argument("--model", help="base checkpoint (needed by hidden-state routers)")


def _expert_map(entries: list[str] | None, model_path: str | None) -> dict[str, str] | None:
    if not entries:
        return None
    from moekit.compose.adapter_io import check_against_model, load_base, read_adapter

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
    from moekit.compose.adapter_io import load_base
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

    if args.route_command == "fit":
        check_router(args.router)
        check_output(args.out, args.data, flag="--out", directory=False, error=RouterError)
        docs = read_documents(args.data)
        unlabelled = [d.source for d in docs if d.domain is None]
        if unlabelled:
            raise RouterError(f"{unlabelled[0]}: no domain; expected every training document labelled with its "
                              f"category (a domain field)")
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
        save_router(router, args.out, args.data)
        print(json.dumps({"router": args.router, "out": args.out, "documents": len(docs),
                          "categories": sorted(set(labels))}, indent=1))
        return 0
    router = load_router(args.router)
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
