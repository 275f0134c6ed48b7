"""`moekit inspect [MODEL] --data FILE... [--out DIR] [--max-tokens N]`: routing analysis report of an MoE model."""

from __future__ import annotations

import argparse

from moekit.inspect.report import DEFAULT_MAX_TOKENS, DEFAULT_OUT, inspect_model
from moekit.inspect.summary import summary_lines

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
    for line in summary_lines(stats):
        print(line)
    print(f"Report: {report}")
    return 0
