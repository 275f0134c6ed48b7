"""`moekit eval [MODEL] [--data FILE ...] [--seq-len N] [--stride N] [--max-tokens N] [--no-skip]`: perplexity
as JSON; `--adapt-routing [--adapt-interval N] [--adapt-steps N] [--adapt-lr F] [--adapt-reg F]
[--adapt-layer L ...]`: with and without test-time rerouting."""

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
    p.add_argument("--adapt-routing", action="store_true",
                   help="instead: perplexity with and without test-time rerouting (logit shifts fitted on each "
                        "chunk's preceding context; moekit.adapt.reroute_online)")
    p.add_argument("--adapt-interval", type=int, default=128, help="tokens per chunk between refits (default 128)")
    p.add_argument("--adapt-steps", type=int, default=5, help="Adam steps per refit (default 5)")
    p.add_argument("--adapt-lr", type=float, help="Adam learning rate of the shifts (default 0.01)")
    p.add_argument("--adapt-reg", type=float, help="weight of the L2 pull of the shifts toward zero (default 0.01)")
    p.add_argument("--adapt-layer", type=int, action="append",
                   help="decoder layer whose router gets a shift (repeatable; default: every MoE layer)")


def run(args: argparse.Namespace) -> int:
    from moekit.eval import evaluate_checkpoint

    if args.adapt_routing:
        from moekit.adapt.reroute_eval import adapted_perplexity
        from moekit.errors import ConfigError
        from moekit.eval import model_and_documents

        for name in ("adapt_interval", "adapt_steps"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
        path, model, tokenizer, docs = model_and_documents(args.model, args.data)
        result = adapted_perplexity(model, tokenizer, docs, interval=args.adapt_interval, seq_len=args.seq_len,
                                    max_tokens=args.max_tokens, steps=args.adapt_steps, layers=args.adapt_layer,
                                    **{k: v for k, v in (("lr", args.adapt_lr), ("reg", args.adapt_reg))
                                       if v is not None})
        print(json.dumps({"model": str(path), "data": args.data or "moekit-tiny held-out split", **result}, indent=1))
        return 0
    print(json.dumps(evaluate_checkpoint(args.model, args.data, args.seq_len, args.stride, args.max_tokens,
                                         skip=not args.no_skip), indent=1))
    return 0
