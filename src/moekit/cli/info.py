"""`moekit info [MODEL] [--json]`: an MoE checkpoint's layout from its config and safetensors headers."""

from __future__ import annotations

import argparse
import json

from moekit.hf.info import describe, format_info

HELP = "what an MoE checkpoint holds (family, layers, experts, routing, params, bytes) without loading its weights"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="a local checkpoint directory (config.json + safetensors); default: moekit-tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        from moekit.default import default_model_path

        args.model = str(default_model_path())
    info = describe(args.model)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
