"""`moekit train --recipe NAME --out DIR [--resume] [--steps N] [--stop-at N]`."""

from __future__ import annotations

import argparse

from moekit.errors import ConfigError

HELP = "train an MoE causal LM on the offline two-domain corpus by a named recipe"


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.train.trainer import RECIPES

    p.add_argument("--recipe", required=True, help=f"one of: {', '.join(sorted(RECIPES))}")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier run with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--stop-at", type=int, help="stop after this step (the schedule still follows --steps)")
    p.add_argument("--prose-dir", help="English reST/text prose for the corpus (default: python3.11-doc or pydoc_data)")
    p.add_argument("--code-dir", help="Python sources for the corpus (default: the standard library)")


def run(args: argparse.Namespace) -> int:
    from moekit.train.trainer import train

    for name in ("steps", "stop_at"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    overrides = {name: value for name, value in (("steps", args.steps), ("prose_dir", args.prose_dir),
                                                 ("code_dir", args.code_dir)) if value is not None}
    records = train(args.recipe, args.out, resume=args.resume, stop_at=args.stop_at, **overrides)
    if records:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}), "
              f"{last['tokens_per_s']:.0f} tokens/s; metrics in {args.out}/metrics.jsonl")
    return 0
