"""`moekit VERB ...`: dispatches to the verb modules; user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from moekit.cli import bench, compress, info, inspect, tour, train
from moekit.cli import eval as eval_verb
from moekit.errors import MoekitError

VERBS = {"bench": bench, "compress": compress, "eval": eval_verb, "info": info, "inspect": inspect, "tour": tour,
         "train": train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Toolkit for sparse Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, module in VERBS.items():
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb].run(args) or 0
    except MoekitError as err:
        print(f"moekit {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
