"""`moekit inspect [MODEL] --data FILE... [--out DIR] [--max-tokens N]`: routing analysis report of an MoE model."""

from __future__ import annotations

import argparse

from moekit.inspect.report import DEFAULT_MAX_TOKENS, DEFAULT_OUT, inspect_model

HELP = "routing analysis of an MoE model: report.html, stats.json and plots"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a local Hugging Face MoE checkpoint directory (default: moekit-tiny)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="text or .jsonl files ({\"text\", \"domain\"} per line; default: moekit-tiny's held-out "
                        "prose and code)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to trace, shared equally among domains (default {DEFAULT_MAX_TOKENS}; 0: all)")


def run(args: argparse.Namespace) -> int:
    report, stats = inspect_model(args.model, args.data, args.out, args.max_tokens or None)
    for ly in stats["layers"]:
        print(f"layer {ly['layer']}: load CV {ly['cv']:.3f}, entropy {ly['entropy_mean']:.3f}, "
              f"dead {ly['dead_experts'] or '-'}, token specialisation {ly['token_specialization']:.3f}, "
              f"domain specialisation {ly['domain_specialization']:.3f}")
    supers = ", ".join(f"layer {s['layer']} expert {s['expert']}" for s in stats["super_experts"]) or "none"
    print(f"super experts: {supers}")
    print(f"Report: {report}")
    return 0
