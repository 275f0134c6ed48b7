"""`moekit VERB ...`: dispatches to the verb modules; user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from moekit.cli import bench, compress, generate, info, inspect, lora, make, place, route, serve, tour, train
from moekit.cli import eval as eval_verb
from moekit.errors import MoekitError

VERBS = {"bench": bench, "compress": compress, "eval": eval_verb, "generate": generate, "info": info,
         "inspect": inspect, "lora": lora, "make": make, "place": place, "route": route, "serve": serve, "tour": tour,
         "train": train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Toolkit for sparse Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, module in VERBS.items():
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary file is removed on the way out."""


def _on_sigterm(signum: int, frame) -> None:  # noqa: ARG001
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return VERBS[args.verb].run(args) or 0
    except MoekitError as err:
        print(f"moekit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C (130) or SIGTERM (143): one line, temporaries already removed
        name = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
        print(f"moekit {args.verb}: {name}; temporary files removed", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
