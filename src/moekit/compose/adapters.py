"""Reading saved PEFT LoRA adapters into plain tensors, and checking that a pool of them fits one base model.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; the update of a linear layer
is scaling * B @ A with scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.files import FileError, check_output

PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out")  # options whose update is not scaling * B @ A


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA adapter as tensors: per target module path, (A [r, in], B [out, r]); scaling is shared."""

    path: str
    rank: int
    scaling: float
    base: str | None  # base_model_name_or_path as PEFT recorded it
    modules: dict[str, tuple[Tensor, Tensor]]


def check_out_dir(out: str | os.PathLike, inputs: list, force: bool = False) -> Path:
    """check_output, and an existing non-empty directory is refused unless force (it would be replaced whole)."""
    final = check_output(out, inputs)
    if final.is_dir() and any(final.iterdir()) and not force:
        raise FileError(f"--out {out}: exists and is not empty; expected a new or empty directory (or --force to "
                        f"replace it)")
    return final


def read_adapter(path: str | os.PathLike) -> LoraWeights:
    """Read a PEFT LoRA adapter directory; one-line ConfigError for anything but a plain LoRA on linear layers."""
    root = Path(path)
    config_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ConfigError(f"adapter {root}: expected a PEFT adapter directory with adapter_config.json and "
                          f"adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter {config_file}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"adapter {config_file}: peft_type {kind!r}; expected 'LORA'")
    for option in UNSUPPORTED:
        if config.get(option):
            raise ConfigError(f"adapter {config_file}: {option}={config[option]!r}; expected a plain LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(f"adapter {config_file}: rank_pattern/alpha_pattern set; expected one rank for every "
                          f"module")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise ConfigError(f"adapter {config_file}: r={rank!r}, lora_alpha={alpha!r}; expected a positive integer "
                          f"rank and a number")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights_file))
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        b = tensors.get(key[:-len("lora_A.weight")] + "lora_B.weight")
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"adapter {weights_file}: {name}: lora_A/lora_B missing or of mismatched shapes")
        modules[name] = (a.float(), b.float())
    if not modules:
        raise ConfigError(f"adapter {weights_file}: no lora_A/lora_B weights")
    return LoraWeights(str(root), rank, scaling, config.get("base_model_name_or_path"), modules)


def check_pool(model: nn.Module, adapters: list[LoraWeights]) -> list[str]:
    """The linear layers the pool adapts (expert-parameter LoRAs are checked by moekit.compose.expert_lora);
    ConfigError when the pool is empty, its adapters disagree (rank, targets, base model) or a target is not a
    linear layer of `model` with the adapter's shapes (an adapter for another base model)."""
    from moekit.compose.expert_lora import experts_path

    if not adapters:
        raise ConfigError("adapter pool is empty; expected at least one PEFT LoRA adapter directory")
    first = adapters[0]
    named = dict(model.named_modules())
    for adapter in adapters:
        if adapter.rank != first.rank:
            raise ConfigError(f"adapter {adapter.path}: rank r={adapter.rank}, but {first.path} has r={first.rank}; "
                              f"expected one rank in a pool")
        if adapter.base and first.base and adapter.base != first.base:
            raise ConfigError(f"adapter {adapter.path}: base model {adapter.base!r}, but {first.path} was trained "
                              f"on {first.base!r}; expected adapters of one base model")
        if set(adapter.modules) != set(first.modules):
            raise ConfigError(f"adapter {adapter.path}: adapts other modules than {first.path}; expected the same "
                              f"target modules in every adapter of a pool")
        for name, (a, b) in adapter.modules.items():
            if experts_path(named, name) is not None:
                continue  # an expert-parameter LoRA (PEFT target_parameters): moekit.compose.expert_lora
            module = named.get(name)
            if module is None:
                raise ConfigError(f"adapter {adapter.path}: module {name!r} does not exist in the base model; "
                                  f"expected an adapter trained on this base model")
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"adapter {adapter.path}: module {name!r} is a {type(module).__name__}; expected "
                                  f"LoRA on nn.Linear layers or on fused expert parameters")
            if (module.in_features, module.out_features) != (a.shape[1], b.shape[0]):
                raise ConfigError(f"adapter {adapter.path}: module {name!r} is {module.in_features}->"
                                  f"{module.out_features} in the base model but {a.shape[1]}->{b.shape[0]} in the "
                                  f"adapter; expected an adapter trained on this base model")
    return sorted(name for name in first.modules if experts_path(named, name) is None)
