"""Every recipe field checked (type, finite, range) before a run writes anything: a NaN learning rate, a negative
step count or a string where a number goes ends in one ConfigError naming the field, not a traceback mid-run or
a saved NaN or untrained model."""

from __future__ import annotations

import math
from typing import Any

from moekit.errors import ConfigError

_BIG = 1 << 31
# field: (kind, low, high); kind "int" or "float"; None bounds are open
_NUMBERS: dict[str, tuple[str, float, float]] = {
    "vocab_size": ("int", 1, 1 << 22),
    "seq_len": ("int", 2, 1 << 20),
    "batch_size": ("int", 1, 1 << 20),
    "steps": ("int", 1, _BIG),
    "grad_accum": ("int", 1, 1 << 16),
    "warmup": ("int", 0, _BIG),
    "save_every": ("int", 0, _BIG),
    "seed": ("int", 0, _BIG),
    "lr": ("float", 0, 10.0),
    "min_lr_ratio": ("float", 0, 1),
    "weight_decay": ("float", 0, 10.0),
    "clip": ("float", 0, math.inf),
    "balance_coef": ("float", 0, 1e3),
    "z_coef": ("float", 0, 1e3),
    "bias_update_rate": ("float", 0, 1.0),
}
_POSITIVE = {"lr", "clip"}  # strictly above their low bound
_OPTIONAL_INTS = {"data_seed": (0, _BIG), "max_docs_per_domain": (1, _BIG)}


def _where(recipe: Any, field: str) -> str:
    return f"recipe {getattr(recipe, 'name', '?')!r}: {field}"


def _number(recipe: Any, field: str, value: Any, kind: str, low: float, high: float) -> None:
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{_where(recipe, field)}={value!r} ({type(value).__name__}); expected "
                          f"{'an integer' if kind == 'int' else 'a number'}")
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{_where(recipe, field)}={value!r}; expected a finite number")
    strict = field in _POSITIVE
    if value < low or (strict and value == low) or value > high:
        lo = f"> {low:g}" if strict else f">= {low:g}"
        hi = "" if math.isinf(high) else f" and <= {high:g}"
        raise ConfigError(f"{_where(recipe, field)}={value!r}; expected a value {lo}{hi}")


def check_recipe(recipe: Any, stop_at: Any = None) -> None:
    """Raise ConfigError naming the first recipe field (or `stop_at`) with a wrong type or an out-of-range value."""
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
        raise ConfigError(f"stop_at={stop_at!r}: expected a positive integer")
    if not isinstance(recipe.name, str) or not recipe.name:
        raise ConfigError(f"recipe name={recipe.name!r}; expected a non-empty string")
    for field, (kind, low, high) in _NUMBERS.items():
        _number(recipe, field, getattr(recipe, field), kind, low, high)
    for field, (low, high) in _OPTIONAL_INTS.items():
        value = getattr(recipe, field)
        if value is not None:
            _number(recipe, field, value, "int", low, high)
    if not isinstance(recipe.model, dict) or not isinstance(recipe.model.get("model_type"), str):
        raise ConfigError(f"{_where(recipe, 'model')}={recipe.model!r}; expected an object of transformers config "
                          "keywords with a string model_type")
    for field in ("prose_dir", "code_dir"):
        value = getattr(recipe, field)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{_where(recipe, field)}={value!r}; expected a directory path (a string) or null")
    if recipe.moe_layer is not None and not isinstance(recipe.moe_layer, dict):
        raise ConfigError(f"{_where(recipe, 'moe_layer')}={recipe.moe_layer!r}; expected an object of moekit.MoE "
                          "keyword arguments or null")
    context = recipe.model.get("max_position_embeddings")
    if isinstance(context, int) and not isinstance(context, bool) and recipe.seq_len > context:
        raise ConfigError(f"{_where(recipe, 'seq_len')}={recipe.seq_len}; expected at most the model's "
                          f"max_position_embeddings={context}")
