"""`moekit train (--recipe NAME | --config FILE) --out DIR [--set KEY=VALUE ...] [--resume] [--steps N]
[--stop-at N]`. Also `torchrun --nproc-per-node N -m moekit.train ...` (same arguments) for expert parallelism."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError

HELP = "train an MoE causal LM on the offline two-domain corpus by a named recipe or a recipe file"


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.train.trainer import RECIPES

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help=f"one of: {', '.join(sorted(RECIPES))}")
    source.add_argument("--config", help="a JSON recipe file: recipe fields, optionally \"base\": a recipe name "
                                         "whose fields it starts from")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier run with --resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (VALUE as JSON, else a string), e.g. --set lr=1e-3 "
                        "--set 'moe_layer={\"router\": \"top_p\"}'")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start again in --out, replacing the training run there (finished, interrupted or failed)")
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--stop-at", type=int, help="stop after this step (the schedule still follows --steps)")
    p.add_argument("--prose-dir", help="English reST/text prose for the corpus (default: python3.11-doc or pydoc_data)")
    p.add_argument("--code-dir", help="Python sources for the corpus (default: the standard library)")


def _field_names() -> set[str]:
    from moekit.train.trainer import Recipe

    return {f.name for f in fields(Recipe)}


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = _field_names()
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def load_recipe_file(path: str):
    """A Recipe from a JSON file of recipe fields (plus an optional `base` recipe name)."""
    from dataclasses import replace

    from moekit.files import MAX_JSON_BYTES, read_bounded
    from moekit.train.trainer import Recipe, get_recipe

    try:
        data = json.loads(read_bounded(path, MAX_JSON_BYTES, "recipe file (JSON)", ConfigError))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); expected an object of recipe fields") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of recipe fields")
    unknown = set(data) - _field_names() - {"base"}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; expected recipe fields "
                          f"{', '.join(sorted(_field_names()))}")
    base = data.pop("base", None)
    data.setdefault("name", Path(path).stem)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base={base!r}; expected a recipe name (a string)")
        return replace(get_recipe(base), **data)
    if "model" not in data and "init_from" not in data:
        raise ConfigError(f"{path}: field 'model' missing; expected transformers config keywords with model_type "
                          "(or a 'base' recipe, or init_from: a checkpoint directory)")
    return Recipe(**data)


def run(args: argparse.Namespace) -> int:
    from moekit.train.trainer import train

    for name in ("steps", "stop_at"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    overrides = _parse_set(args.set)
    overrides.update({name: value for name, value in (("steps", args.steps), ("prose_dir", args.prose_dir),
                                                      ("code_dir", args.code_dir)) if value is not None})
    recipe = load_recipe_file(args.config) if args.config else args.recipe
    records = train(recipe, args.out, resume=args.resume, stop_at=args.stop_at, force=args.force, **overrides)
    if records and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}), "
              f"{last['tokens_per_s']:.0f} tokens/s; metrics in {args.out}/metrics.jsonl")
    return 0
