"""`moekit make MODEL --method P --experts E --k K [--router R] [--layers L,...] [--data FILE] --out DIR`."""

from __future__ import annotations

import argparse
import json

HELP = ("turn a dense decoder (Qwen3, Qwen2, Llama, Mistral, dense DeepSeek-V3) into a native MoE (Qwen3-MoE, "
        "Qwen2-MoE, Mixtral, DeepSeek-V3) by splitting its FFNs")


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.make import PARTITIONS, ROUTERS, UPCYCLE_ROUTERS

    p.add_argument("model", metavar="MODEL", help="a dense checkpoint directory (config.json + safetensors)")
    p.add_argument("--method", choices=(*PARTITIONS, "upcycle"), default="kmeans",
                   help="how neurons are grouped into experts, or upcycle: every expert a copy (default kmeans)")
    p.add_argument("--router", choices=tuple(dict.fromkeys((*ROUTERS, *UPCYCLE_ROUTERS))),
                   help=f"split experts: {', '.join(ROUTERS)} (default centroid); upcycle: "
                        f"{', '.join(UPCYCLE_ROUTERS)} (default random)")
    p.add_argument("--experts", type=int, required=True, help="experts per FFN (a divisor of its width)")
    p.add_argument("--k", type=int, required=True, help="experts per token")
    p.add_argument("--shared", type=int, help="shared experts of the routed width (default: 1 for Qwen2 and "
                   "DeepSeek-V3, whose MoE families have one; 0 otherwise); split experts: I / (E + shared) wide")
    p.add_argument("--layers", help="comma-separated layer indices to convert (default: all)")
    p.add_argument("--data", action="append", metavar="FILE", help="calibration text (.jsonl or text; repeatable)")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from moekit.errors import ConfigError
    from moekit.make.run import make_checkpoint

    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ConfigError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    router = args.router or ("random" if args.method == "upcycle" else "centroid")
    summary = make_checkpoint(args.model, args.out, args.experts, args.k, args.method, router, layers,
                              args.data, args.max_tokens, args.seed, args.force, shared=args.shared)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['source_type']} -> {summary['target_type']}: {summary['experts']} experts, k={summary['k']}, "
              f"partition {summary['partition']}, router {summary['router']}, layers {summary['layers']}; "
              f"written to {summary['out']}")
    return 0
