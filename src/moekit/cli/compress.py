"""`moekit compress [MODEL] --method M --ratio R [--quant Q] [--data CAL] --out DIR [--force]`."""

from __future__ import annotations

import argparse
import json
import sys

from moekit.compress import METHODS
from moekit.compress.trained import TRAINED

HELP = "prune, merge or quantize the experts of an MoE checkpoint; writes checkpoint, plan.json and report.json"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    p.add_argument("--method", choices=[*METHODS, *TRAINED],
                   help="; ".join(f"{k}: {v}" for k, v in {**METHODS, **TRAINED}.items()))
    p.add_argument("--ratio", type=float, help="fraction of each layer's experts removed (heapr: of all neurons)")
    p.add_argument("--quant", help="int8, int4, ternary or mixed:<bytes> (routed experts)")
    p.add_argument("--data", action="append", metavar="CAL", help="calibration text (.jsonl or text; repeatable)")
    p.add_argument("--eval-data", action="append", metavar="FILE",
                   help="held-out text for perplexity (default: moekit-tiny's held-out split for moekit-tiny)")
    p.add_argument("--task", help="frequency/tcess/reconstruct/uncurl: score or cluster experts on this domain's "
                                  "calibration text")
    p.add_argument("--protect-super", action="store_true",
                   help="never remove or merge away super experts (found as `moekit inspect` finds them, confirmed "
                        "by ablation on the --data text)")
    p.add_argument("--lowrank", type=float, metavar="FRACTION",
                   help="after the method (e.g. merging, as MC-SMoE), store every expert as rank "
                        "round(FRACTION * min(H, I)) SVD factors")
    p.add_argument("--skip", type=float, metavar="FRACTION",
                   help="dynamic skipping: calibrate per-layer thresholds that skip this fraction of the second and "
                        "later experts (written to skip.json; the perplexity after is measured with them)")
    p.add_argument("--keep", type=int, help="compressed-experts: experts per token run in full (default 1)")
    p.add_argument("--rank", type=int, help="compressed-experts: rank of each compressed expert (default 8)")
    p.add_argument("--steps", type=int,
                   help="mote: ternary training steps per layer (default 100); compressed-experts: distillation "
                        "steps (default 200)")
    p.add_argument("--cal-tokens", type=int, default=8192, help="calibration tokens at most (default 8192)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens at most (default 16384)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from moekit.compress.run import compress_checkpoint

    report = compress_checkpoint(args.model, args.out, args.method, args.ratio, args.quant, args.data,
                                 args.eval_data, args.task, args.protect_super, args.force, args.cal_tokens,
                                 args.eval_tokens, skip=args.skip, lowrank=args.lowrank,
                                 keep=args.keep, rank=args.rank, steps=args.steps)
    for message in report["warnings"]:
        print(f"moekit compress: warning: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    ppl = ("-" if report["ppl_before"] is None else
           f"{report['ppl_before']:.3f} -> {report['ppl_after']:.3f} on {report['evaluation']['tokens']} tokens")
    print(f"{args.out}: {report['layout']} checkpoint, bytes {report['bytes_before']:,} -> {report['bytes_after']:,}, "
          f"params {report['params_before']:,} -> {report['params_after']:,}, experts per layer "
          f"{report['experts_per_layer']}, held-out perplexity {ppl}; plan.json and report.json written")
    return 0
