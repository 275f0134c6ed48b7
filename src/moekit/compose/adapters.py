"""LoRA adapters as PEFT saves them (`adapter_config.json` + `adapter_model.safetensors`): read with checks, viewed
as one (A, B, scaling) per adapted module, checked against a base model or against each other as a pool, and
written atomically so that `PeftModel.from_pretrained` loads the result.

A module's update is ΔW = scaling · B @ A with A: [r, in], B: [out, r] and scaling = lora_alpha / r
(lora_alpha / sqrt(r) under rsLoRA); PEFT's keys are `base_model.model.<module>.lora_A.weight` and `...lora_B.weight`.

`read_adapter` keeps what writing an adapter back needs (the config as saved, every tensor in its stored dtype, rank
and alpha patterns), for merges and ComPEFT; `read_weights` is the float view a mixture needs (`LoraWeights`: one
rank, no patterns, module names without PEFT's prefix).

The LoRA initialisation: PEFT draws A from Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and sets
B = 0. `init_lora_a(peft_model, seed)` redraws every A from that law with a generator seeded by (seed, module name)
alone, so `lora_init.json` ({"rule", "seed"}) beside the adapter regenerates A_init exactly (`LoraAdapter.a_init`):
what ComPEFT needs to compress the update A - A_init rather than A.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.files import MAX_JSON_BYTES, FileError, check_output, read_bounded, swap_in, temp_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INIT_NAME = "lora_init.json"
INIT_RULE = "kaiming-uniform/crc32"  # lora_a_init's law and seeding; a new rule gets a new name
PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out")  # options whose update is not scaling * B @ A
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(ConfigError):
    """An adapter directory that is missing, malformed, or does not fit the base model or the other adapters."""


def lora_a_init(seed: int, module: str, shape: tuple[int, ...]) -> Tensor:
    """A_init of `module` (its name without PEFT's prefix): U(-1/sqrt(in), 1/sqrt(in)) [r, in] from a generator
    seeded by seed and crc32(module) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))
    return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[-1])


def init_lora_a(peft_model: nn.Module, seed: int, adapter_name: str = "default") -> dict:
    """Redraw every lora_A of `peft_model` by lora_a_init; returns the record to save as lora_init.json."""
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
                w = lora_a[adapter_name].weight
                w.copy_(lora_a_init(seed, name.removeprefix(PREFIX), tuple(w.shape)).to(w.dtype))
    return {"rule": INIT_RULE, "seed": seed}


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: its directory, config (the JSON as saved), tensors (PEFT's key names) and its
    initialisation record (lora_init.json, None when absent)."""

    path: Path
    config: dict
    tensors: dict[str, Tensor] = field(repr=False)
    init: dict | None = None
    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    def scaling(self, module: str) -> float:
        r = _pattern(self.config.get("rank_pattern") or {}, module, self.rank)
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def modules(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module key prefix: (A [r, in], B [out, r], scaling)} for every adapted module."""
        parts: dict[str, dict[str, Tensor]] = {}
        for key, t in self.tensors.items():
            m = _KEY.match(key)
            if m:
                parts.setdefault(m["module"], {})[m["part"]] = t
        out = {}
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{self.path}: module {module} has only lora_{''.join(ab)}; expected lora_A and "
                                   f"lora_B")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise AdapterError(f"{self.path}: module {module}: lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}; expected A [r, in] and B [out, r] of one rank")
            out[module] = (a, b, self.scaling(module))
        return out

    def a_init(self, module: str, shape: tuple[int, ...]) -> Tensor | None:
        """A_init of `module` (a key prefix of modules()) regenerated from the init record; None without one."""
        if self.init is None:
            return None
        return lora_a_init(int(self.init["seed"]), module.removeprefix(PREFIX), shape)

    def deltas(self) -> dict[str, Tensor]:
        """{module: ΔW [out, in] in float32}."""
        return {m: s * (b.float() @ a.float()) for m, (a, b, s) in self.modules().items()}


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA adapter as tensors: per target module path, (A [r, in], B [out, r]); scaling is shared."""

    path: str
    rank: int
    scaling: float
    base: str | None  # base_model_name_or_path as PEFT recorded it
    modules: dict[str, tuple[Tensor, Tensor]]


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():  # PEFT's rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """The LoRA adapter saved in directory `path` (refuses a missing directory, a non-LoRA PEFT type, no weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"{p}: not a directory; expected a PEFT adapter directory ({CONFIG_NAME}, {WEIGHTS_NAME})")
    if not (p / CONFIG_NAME).is_file():
        raise AdapterError(f"{p}: no {CONFIG_NAME}; expected a PEFT adapter directory ({CONFIG_NAME}, {WEIGHTS_NAME})")
    raw = read_bounded(p / CONFIG_NAME, MAX_JSON_BYTES, "adapter config", AdapterError)
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{p / CONFIG_NAME}: not JSON ({e}); expected PEFT's adapter config") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{p / CONFIG_NAME}: peft_type {kind!r}; expected 'LORA'")
    if not (p / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{p}: no {WEIGHTS_NAME}; expected the adapter's weights in safetensors")
    try:
        tensors = load_file(p / WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{p / WEIGHTS_NAME}: cannot read ({e}); expected a safetensors file") from None
    adapter = LoraAdapter(p, config, tensors, _read_init(p))
    if not adapter.modules():
        raise AdapterError(f"{p / WEIGHTS_NAME}: no lora_A/lora_B tensors; expected a LoRA adapter's weights")
    return adapter


def _read_init(p: Path) -> dict | None:
    if not (p / INIT_NAME).is_file():
        return None
    try:
        record = json.loads(read_bounded(p / INIT_NAME, MAX_JSON_BYTES, "LoRA init record", AdapterError))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{p / INIT_NAME}: not JSON ({e}); expected {{\"rule\", \"seed\"}}") from None
    if not isinstance(record, dict) or record.get("rule") != INIT_RULE or not isinstance(record.get("seed"), int):
        raise AdapterError(f"{p / INIT_NAME}: {record!r}; expected {{\"rule\": \"{INIT_RULE}\", \"seed\": <int>}}")
    return record


def read_weights(path: str | os.PathLike) -> LoraWeights:
    """The adapter in `path` as float tensors for mixing; one-line AdapterError for anything but a plain LoRA of
    one rank."""
    adapter = read_adapter(path)
    config, config_file = adapter.config, adapter.path / CONFIG_NAME
    for option in UNSUPPORTED:
        if config.get(option):
            raise AdapterError(f"adapter {config_file}: {option}={config[option]!r}; expected a plain LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"adapter {config_file}: rank_pattern/alpha_pattern set; expected one rank for every "
                           f"module")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise AdapterError(f"adapter {config_file}: r={rank!r}, lora_alpha={alpha!r}; expected a positive integer "
                           f"rank and a number")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules = {m.removeprefix(PREFIX): (a.float(), b.float()) for m, (a, b, _) in adapter.modules().items()}
    return LoraWeights(str(adapter.path), rank, scaling, config.get("base_model_name_or_path"), modules)


def read_pool(paths: list[str | os.PathLike], flag: str = "ADAPTER") -> list[LoraAdapter]:
    """Several adapters for one purpose; an empty pool is refused."""
    if not paths:
        raise AdapterError(f"{flag}: empty adapter pool; expected at least one PEFT LoRA adapter directory")
    return [read_adapter(p) for p in paths]


def _model_module(model: nn.Module, key: str) -> nn.Module | None:
    names = dict(model.named_modules())
    for prefix in ("base_model.model.", ""):
        if key.startswith(prefix) and key[len(prefix):] in names:
            return names[key[len(prefix):]]
    return None


def check_against_model(adapter: LoraAdapter, model: nn.Module, model_name: str = "the base model") -> None:
    """Refuses an adapter whose modules are absent from `model` or whose shapes differ from them (an adapter trained
    on another base model)."""
    for key, (a, b, _) in adapter.modules().items():
        module = _model_module(model, key)
        if module is None:
            raise AdapterError(f"{adapter.path}: module {key} does not exist in {model_name}; expected an adapter "
                               f"trained on this base model")
        weight = getattr(module, "weight", None)
        if adapter.config.get("target_parameters") and not isinstance(weight, Tensor):
            continue  # LoRA on a fused expert parameter (PEFT target_parameters): the module exists, PEFT checks it
        if not isinstance(weight, Tensor) or weight.dim() != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise AdapterError(f"{adapter.path}: module {key} adapts a [{b.shape[0]}, {a.shape[1]}] weight, "
                               f"{model_name} has {shape}; expected an adapter trained on this base model")


def check_same_shapes(adapters: list[LoraAdapter], same_rank: bool = False) -> None:
    """Adapters to combine must adapt modules of equal shape (one base model); `same_rank`: and have one rank."""
    first = adapters[0]
    ref = {m: (b.shape[0], a.shape[1]) for m, (a, b, _) in first.modules().items()}
    for other in adapters[1:]:
        if same_rank and other.rank != first.rank:
            raise AdapterError(f"{other.path}: rank r={other.rank}, {first.path} has r={first.rank}; expected one rank "
                               f"for this method (or a method that allows mixed ranks: sum, cat, svd)")
        for m, (a, b, _) in other.modules().items():
            if m in ref and ref[m] != (b.shape[0], a.shape[1]):
                raise AdapterError(f"{other.path}: module {m} adapts a {list((b.shape[0], a.shape[1]))} weight, "
                                   f"{first.path} a {list(ref[m])} one; expected adapters of one base model")


def check_out_dir(out: str | os.PathLike, inputs: list, force: bool = False) -> Path:
    """check_output, and an existing non-empty directory is refused unless force (it would be replaced whole)."""
    final = check_output(out, inputs)
    if final.is_dir() and any(final.iterdir()) and not force:
        raise FileError(f"--out {out}: exists and is not empty; expected a new or empty directory (or --force to "
                        f"replace it)")
    return final


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


def write_adapter(out: str | os.PathLike, config: dict, tensors: dict[str, Tensor],
                  inputs: list[str | os.PathLike] = (), extra: dict[str, str] | None = None) -> Path:
    """Write a PEFT adapter directory atomically (an output equal to or inside an input is refused); `extra`:
    more files {name: text} to put beside it."""
    from safetensors.torch import save_file

    final = check_output(out, inputs, flag="--out", error=AdapterError)
    with temp_dir(final, "adapter") as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        swap_in(tmp, final)
    return final


def lora_tensors(modules: dict[str, tuple[Tensor, Tensor]], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """PEFT key names for {module: (A, B)}."""
    out = {}
    for m, (a, b) in modules.items():
        out[f"{m}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{m}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


def load_base(path: str | os.PathLike | None) -> tuple[Path, nn.Module, object | None]:
    """(directory, causal LM in float32 eval mode, tokenizer or None) of a local checkpoint, MoE or dense (the
    default model's dense twin is a base for adapters too; safetensors only); None: the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.default import default_model_path

    p = Path(path) if path is not None else default_model_path()
    if not (p / "config.json").is_file():
        raise AdapterError(f"--model {p}: no config.json; expected a checkpoint directory")
    if not any(p.glob("*.safetensors")):
        raise AdapterError(f"--model {p}: no .safetensors weights; expected a checkpoint stored as safetensors")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, output_loading_info=True,
                                                           use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split())[:200]
        raise AdapterError(f"--model {p}: cannot load ({reason}); expected a transformers causal LM") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise AdapterError(f"--model {p}: {missing[0]} missing from the weights; expected a complete checkpoint")
    tokenizer = None
    if (p / "tokenizer.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(p)
        except Exception as e:  # noqa: BLE001 (json, tokenizers and transformers errors share no base class)
            raise AdapterError(f"--model {p}: the tokenizer files cannot be read ({str(e)[:200]})") from None
    return p, model.eval(), tokenizer
