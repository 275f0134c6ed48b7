"""`moekit eval [MODEL] [--data FILE ...] [--seq-len N] [--stride N] [--max-tokens N] [--no-skip]`: perplexity
as JSON."""

from __future__ import annotations

import argparse
import json

HELP = "sliding-window perplexity of a checkpoint on text, overall and per domain (JSON)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    p.add_argument("--data", action="append", metavar="FILE",
                   help=".jsonl (text, domain) or text files (default: moekit-tiny's held-out split)")
    p.add_argument("--seq-len", type=int, help="window length (default: min(512, the model's context))")
    p.add_argument("--stride", type=int, help="window step (default: seq-len / 2)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--no-skip", action="store_true",
                   help="ignore a skip.json beside the checkpoint (written by moekit compress --skip)")


def run(args: argparse.Namespace) -> int:
    from moekit.eval import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.model, args.data, args.seq_len, args.stride, args.max_tokens,
                                         skip=not args.no_skip), indent=1))
    return 0
