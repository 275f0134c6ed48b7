"""`moekit place [MODEL] --devices N [--data FILE...] [--replicas R] --out placement.json`: expert placement."""

from __future__ import annotations

import argparse

from moekit.serve.place_model import place_model, summary_lines

HELP = "place each layer's experts on N devices from a routing trace (MoETuner integer program, EPLB replicas)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a local Hugging Face MoE checkpoint directory (default: moekit-tiny)")
    p.add_argument("--devices", type=int, required=True, help="number of devices to place the experts on")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="text or .jsonl files to trace (default: moekit-tiny's held-out prose and code)")
    p.add_argument("--replicas", type=int, default=0, help="extra copies of hot experts per layer (EPLB; default 0)")
    p.add_argument("--out", default="placement.json", help="output JSON file (default: placement.json)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens to trace (default 16384; 0: all)")
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="seconds for the search and the integer program together before the best placement found "
                        "is taken (default 60)")
    p.add_argument("--step-tokens", type=int, default=2048, help="tokens per simulated step (default 2048)")
    p.add_argument("--load-weight", type=float, default=1.0,
                   help="weight of the max-device-load term against cross-device tokens (default 1)")
    p.add_argument("--sweep", action="store_true", help="also place and simulate 2, 4, ..., 64 devices")


def run(args: argparse.Namespace) -> int:
    result = place_model(args.model, args.data, args.devices, args.out, replicas=args.replicas,
                         max_tokens=args.max_tokens or None, sweep=args.sweep, time_limit=args.time_limit,
                         step_tokens=args.step_tokens, load_weight=args.load_weight)
    for line in summary_lines(result):
        print(line)
    print(f"Placement: {args.out}")
    return 0
