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
    "seq_balance_coef": ("float", 0, 1e3),
}
DTYPES = ("fp32", "bf16")
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
    init_from = getattr(recipe, "init_from", None)
    for field, (kind, low, high) in _NUMBERS.items():
        low = 0 if field == "steps" and init_from is not None else low  # 0 steps: the checkpoint saved as it was
        _number(recipe, field, getattr(recipe, field), kind, low, high)
    for field, (low, high) in _OPTIONAL_INTS.items():
        value = getattr(recipe, field)
        if value is not None:
            _number(recipe, field, value, "int", low, high)
    model = _check_start(recipe)
    if not isinstance(model, dict) or not isinstance(model.get("model_type"), str):
        raise ConfigError(f"{_where(recipe, 'model')}={recipe.model!r}; expected an object of transformers config "
                          "keywords with a string model_type")
    for field in ("prose_dir", "code_dir"):
        value = getattr(recipe, field)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{_where(recipe, field)}={value!r}; expected a directory path (a string) or null")
    if recipe.moe_layer is not None and not isinstance(recipe.moe_layer, dict):
        raise ConfigError(f"{_where(recipe, 'moe_layer')}={recipe.moe_layer!r}; expected an object of moekit.MoE "
                          "keyword arguments or null")
    context = model.get("max_position_embeddings")
    if isinstance(context, int) and not isinstance(context, bool) and recipe.seq_len > context:
        raise ConfigError(f"{_where(recipe, 'seq_len')}={recipe.seq_len}; expected at most the model's "
                          f"max_position_embeddings={context}")
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"{_where(recipe, 'dtype')}={recipe.dtype!r}; expected one of {', '.join(DTYPES)}")
    _check_balancing(recipe, model)


def _check_start(recipe: Any) -> Any:
    """The model config the checks below read: the recipe's `model`, or init_from's config.json (then `model` and
    `moe_layer` are not used; lora_moe needs init_from)."""
    init_from, lora_moe = getattr(recipe, "init_from", None), getattr(recipe, "lora_moe", None)
    if lora_moe is not None and init_from is None:
        raise ConfigError(f"{_where(recipe, 'lora_moe')} needs init_from; expected the checkpoint directory the "
                          "adapters were trained on")
    if init_from is None:
        return recipe.model
    if not isinstance(init_from, str) or not init_from:
        raise ConfigError(f"{_where(recipe, 'init_from')}={init_from!r}; expected a checkpoint directory (a string)")
    if recipe.moe_layer is not None:
        raise ConfigError(f"{_where(recipe, 'moe_layer')} with init_from: expected one of them (moe_layer builds a "
                          "new model)")
    from moekit.train.init_from import checkpoint_config

    config = checkpoint_config(init_from, _where(recipe, "init_from"))
    if lora_moe is not None:
        _check_lora_moe(recipe, lora_moe)
    return config


def _check_lora_moe(recipe: Any, spec: Any) -> None:
    from moekit.compose.domains import DOMAINS
    from moekit.compose.lora_moe import KINDS
    from moekit.compose.rules import RULES
    from moekit.train.init_from import LORA_MOE_KEYS

    where = _where(recipe, "lora_moe")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}={spec!r}; expected an object with adapters, rule, ...")
    unknown = sorted(set(spec) - set(LORA_MOE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(LORA_MOE_KEYS)}")
    adapters = spec.get("adapters")
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) and a for a in adapters):
        raise ConfigError(f"{where}.adapters={adapters!r}; expected a non-empty list of PEFT adapter directories")
    for key, names in (("rule", RULES), ("kind", KINDS)):
        if key in spec and spec[key] not in names:
            raise ConfigError(f"{where}.{key}={spec[key]!r}; expected one of {', '.join(names)}")
    domains = spec.get("domains")
    if domains is not None and (not isinstance(domains, list) or len(domains) != len(adapters)
                                or any(d not in DOMAINS for d in domains)):
        raise ConfigError(f"{where}.domains={domains!r}; expected one domain of {', '.join(DOMAINS)} per adapter, "
                          "in the adapters' order")
    if not isinstance(spec.get("train_experts", False), bool):
        raise ConfigError(f"{where}.train_experts={spec['train_experts']!r}; expected true or false")
    for key in ("k", "min_k", "expert", "budget", "seq_rank"):
        if key in spec:
            _number(recipe, f"lora_moe.{key}", spec[key], "int", 0 if key == "expert" else 1, _BIG)
    for key, high in (("aux_weight", 1e3), ("top_p", 1.0), ("q", 10.0), ("threshold", 1.0), ("seq_alpha", 1e4)):
        if key in spec:
            _number(recipe, f"lora_moe.{key}", spec[key], "float", 0, high)
    if spec.get("rule") == "fixed" and not spec.get("train_experts") and recipe.steps:
        raise ConfigError(f"{where}.rule='fixed' trains nothing (its routers are not used); expected steps=0, "
                          "train_experts=true or another rule")
    if recipe.bias_update_rate or recipe.seq_balance_coef:
        raise ConfigError(f"{where}: bias_update_rate / seq_balance_coef balance the base model, which lora_moe "
                          "freezes; expected 0")


def _check_balancing(recipe: Any, model: dict) -> None:
    """Balancing a native family needs an MoE family, and the correction bias a sigmoid router that has one;
    DeepSeek-V3's groups must divide its experts."""
    model_type = model.get("model_type")
    if recipe.moe_layer is None and (recipe.bias_update_rate or recipe.seq_balance_coef):
        from moekit.hf.families import FAMILIES

        family = FAMILIES.get(model_type)
        if family is None:
            raise ConfigError(f"{_where(recipe, 'bias_update_rate')} / seq_balance_coef need an MoE model; "
                              f"model_type={model_type!r} is not one of {', '.join(sorted(FAMILIES))}")
        if recipe.bias_update_rate and not family.routing.startswith("sigmoid"):
            raise ConfigError(f"{_where(recipe, 'bias_update_rate')} needs a router with a correction bias; "
                              f"{family.name} has none (expected model_type 'deepseek_v3')")
    if model_type == "deepseek_v3":
        experts, groups = model.get("n_routed_experts", 256), model.get("n_group", 8)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or experts % groups:
            raise ConfigError(f"{_where(recipe, 'model')}: n_group={groups!r}; expected a divisor of "
                              f"n_routed_experts={experts}")
