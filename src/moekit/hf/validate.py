"""`check_checkpoint(path)`: the one check of a checkpoint directory before any model object is built. Both
`moekit.hf.load` and `moekit info` call it, so `info` refuses exactly what the loader refuses.

It reads config.json, moekit.json and the safetensors headers only, in this order:
1. config.json: a JSON object of bounded size naming a supported family, whose `num_hidden_layers` is a positive
   integer no larger than the layers the weights hold (checked on the raw JSON: transformers builds per-layer
   lists from it);
2. the weight files: the index (a 'metadata' object, a 'weight_map' of strings, shards inside the directory) and
   every header (`moekit.hf.headers.read_header`: dtypes, shapes, offsets tiling the data exactly, metadata);
3. the transformers config: every size the family table names at most the number of elements stored, k
   (num_experts_per_tok) in 1..experts of every MoE layer, group-limited routing that can reach k experts, a
   moekit manifest of the config's family whose layers are MoE layers;
4. the model the config (and manifest) describe, built on the meta device (no memory): every tensor it needs is in
   the weights with its shape, nothing else is, floats where it holds floats, and all routed-expert tensors in one
   dtype (a relabelled expert tensor has the right size but another dtype).
Checkpoints with a `quantization_config` (the hub's FP8 or MXFP4 files) get steps 1-3 only: they store other
tensors than the model holds.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.errors import MoekitError
from moekit.hf.families import Family, family_by_type, family_of
from moekit.hf.headers import CheckpointError, TensorInfo, read_checkpoint
from moekit.hf.manifest import _QUANT_TENSOR, MANIFEST, build_manifest_model, main_dtype, read_manifest

CONFIG = "config.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


@dataclass(frozen=True)
class Checked:
    """What `check_checkpoint` read: the transformers config, its family, every stored tensor (from the headers)
    and moekit.json (`read_manifest`'s result, None for a native checkpoint)."""

    directory: Path
    config: Any
    family: Family
    tensors: dict[str, TensorInfo]
    manifest: dict | None


def read_raw_config(directory: Path) -> dict:
    """config.json as JSON (at most `moekit.files.MAX_JSON_BYTES`), an object naming a supported family."""
    from moekit.files import MAX_JSON_BYTES, read_bounded

    path = directory / CONFIG
    if not path.exists():
        raise CheckpointError(f"{path}: missing; expected a transformers config.json in the checkpoint directory")
    raw = read_bounded(path, MAX_JSON_BYTES, "transformers config.json", CheckpointError)
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: cannot be read as a transformers config: expected JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: cannot be read as a transformers config: expected a JSON object")
    family_by_type(config.get("model_type"), source=str(path))
    return config


def read_config(directory: Path):
    """The transformers config of a checkpoint directory (config.json only), with its family checked."""
    from transformers import AutoConfig

    path = directory / CONFIG
    read_raw_config(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 (json, validation and hub errors share no base class)
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path}: cannot be read as a transformers config: {reason}") from None
    family_of(config, source=str(path))
    return config


def _stored_layers(tensors: dict[str, TensorInfo]) -> int:
    """How many decoder layers the weights can hold: one past the highest `layers.N.` index, and never more than
    the tensors stored (a name `layers.1000000000.x` does not make a billion layers)."""
    indices = [int(m.group(1)) for name in tensors if (m := _LAYER.search(name))]
    return min(max(indices) + 1, len(tensors)) if indices else 0


def _positive_int(path: Path, key: str, value: object, bound: int, what: str, raw: dict, config: Any = None) -> int:
    """`value` (config field `key`) a positive integer at most `bound`; says when neither the field nor an alias
    of it is in the raw config.json (transformers then gives its default, sized for a large release)."""
    names = getattr(config, "attribute_map", {})  # e.g. Qwen3-MoE: num_experts is stored as num_local_experts
    aliases = {names.get(key), *(a for a, target in names.items() if target == key)}
    unset = "" if raw.keys() & {key, *aliases} else " (not in the file: transformers' default)"
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{path}: {key}={value!r}{unset}; expected a positive integer")
    if value > bound:
        raise CheckpointError(f"{path}: {key}={value}{unset}; expected at most {bound:,} ({what})")
    return value


def check_checkpoint(path: str | Path) -> Checked:
    """Check the checkpoint directory `path` (steps 1-4 above) and return what was read. Raises a MoekitError
    (CheckpointError, or UnknownNameError / ConfigError for an unsupported or dense model) whose one-line message
    names the file, the field and what was expected."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + safetensors)")
    source = directory / CONFIG
    raw = read_raw_config(directory)
    tensors = read_checkpoint(directory)
    stored = _stored_layers(tensors)
    what = f"the weights hold {stored} decoder layers" if stored else "the weights hold no layers.N tensor"
    if "num_hidden_layers" in raw:
        _positive_int(source, "num_hidden_layers", raw["num_hidden_layers"], stored, what, raw)
    config = read_config(directory)
    _positive_int(source, "num_hidden_layers", config.num_hidden_layers, stored, what, raw, config)
    family = family_of(config, source=str(source))
    elements = sum(t.numel for t in tensors.values())
    for key in dict.fromkeys(("hidden_size", "vocab_size", family.experts_key, family.width_key)):
        _positive_int(source, key, getattr(config, key, None), elements, "the elements the weights hold", raw,
                      config)
    manifest = None
    if (directory / MANIFEST).exists():
        manifest = read_manifest(directory)
        _check_manifest(directory, manifest, config, family)
    _check_routing(source, config, family, manifest)
    if getattr(config, "quantization_config", None) is None:
        _check_tensors(directory, config, family, manifest, tensors)
    return Checked(directory, config, family, tensors, manifest)


def _check_manifest(directory: Path, manifest: dict, config: Any, family: Family) -> None:
    path = directory / MANIFEST
    if manifest["family"] != family.model_type:
        raise CheckpointError(f"{path}: family {manifest['family']!r} but config.json says {family.model_type!r}; "
                              f"expected the same")
    moe = set(family.moe_layers(config))
    for layer in sorted({*manifest["layers"], *manifest["quant"]}):
        if layer not in moe:
            raise CheckpointError(f"{path}: layer {layer} is not an MoE layer of config.json ({family.dense_rule}, "
                                  f"{config.num_hidden_layers} layers); expected one of {sorted(moe)}")


def _check_routing(source: Path, config: Any, family: Family, manifest: dict | None) -> None:
    """k in 1..E for every MoE layer (E from the manifest where it resizes the layer); group-limited routing whose
    groups divide the experts and reach at least k of them."""
    k = getattr(config, family.k_key, None)
    experts = family.num_experts(config)
    per_layer = {layer: experts for layer in family.moe_layers(config)}
    per_layer.update({layer: e for layer, (e, _) in (manifest or {}).get("layers", {}).items()})
    fewest = min(per_layer, key=per_layer.get)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= per_layer[fewest]:
        raise CheckpointError(f"{source}: {family.k_key}={k!r}; expected an integer in 1..{per_layer[fewest]} (the "
                              f"experts of layer {fewest})")
    limited = family.routing == "sigmoid_group_topk" or (
        family.routing == "softmax_group_topk" and getattr(config, "topk_method", None) == "group_limited_greedy")
    if not limited:
        return
    groups, topk_group = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    if not isinstance(groups, int) or groups < 1 or experts % groups:
        raise CheckpointError(f"{source}: n_group={groups!r}; expected a positive divisor of {family.experts_key}="
                              f"{experts}")
    if family.routing == "sigmoid_group_topk" and experts // groups < 2:  # groups ranked by their 2 best experts
        raise CheckpointError(f"{source}: n_group={groups}; expected groups of at least 2 experts ("
                              f"{family.experts_key}={experts})")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= groups:
        raise CheckpointError(f"{source}: topk_group={topk_group!r}; expected an integer in 1..{groups} (n_group)")
    if k > topk_group * (experts // groups):
        raise CheckpointError(f"{source}: {family.k_key}={k}; expected at most {topk_group * (experts // groups)} "
                              f"(topk_group={topk_group} groups of {experts // groups} experts)")


def _meta_model(directory: Path, config: Any, family: Family, manifest: dict | None, dtype: torch.dtype):
    """The model config.json (and moekit.json) describe, on the meta device."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.auto_map = {}  # moekit builds the family's own classes, never a checkpoint's modeling file
    try:
        with torch.device("meta"):
            if manifest is not None:
                return build_manifest_model(config, manifest, family, dtype, directory / MANIFEST)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except MoekitError:
        raise
    except Exception as err:  # noqa: BLE001 (transformers and torch raise many kinds for impossible sizes)
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        where = f"{directory / MANIFEST} with config.json" if manifest is not None else str(directory / CONFIG)
        raise CheckpointError(f"{where}: describes a model that cannot be built ({reason}); expected sizes that "
                              f"fit together") from None


def _expected_variants(model, native: bool) -> list[tuple[dict, set]]:
    """(every tensor name -> meta tensor, names the file must hold) by the model's in-memory names and, for a
    native checkpoint, by the names transformers saves (per-expert tensors, the family's original names)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    full = model.state_dict()
    required = remove_tied_weights_from_state_dict(dict(full), model)
    variants = [(full, set(required))]
    if native:
        variants.append((revert_weight_conversion(model, dict(full)),
                         set(revert_weight_conversion(model, dict(required)))))
    return variants


def _matches(patterns: list[str] | None, name: str) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def _check_tensors(directory: Path, config: Any, family: Family, manifest: dict | None,
                   tensors: dict[str, TensorInfo]) -> None:
    """Every stored tensor against the model config.json describes: names, shapes, float or exact dtypes, and one
    dtype for all routed-expert tensors."""
    model = _meta_model(directory, config, family, manifest, main_dtype(tensors))
    sizes = ", ".join(f"{key}={getattr(config, key)}" for key in dict.fromkeys(
        ("hidden_size", family.experts_key, family.width_key, "num_hidden_layers")))
    source = f"{MANIFEST} with {CONFIG} ({sizes})" if manifest is not None else f"{CONFIG} ({sizes})"
    full, required = max(_expected_variants(model, manifest is None), key=lambda v: len(v[0].keys() & tensors))
    for name in sorted(tensors.keys() & full.keys()):
        stored, want = tensors[name], full[name]
        if stored.shape != tuple(want.shape):
            raise CheckpointError(f"{directory / stored.file}: {name} is {stored.dtype}{list(stored.shape)}; "
                                  f"{source} expects {list(want.shape)}")
        expected = "a float dtype" if want.dtype.is_floating_point else _ST_DTYPES.get(want.dtype, str(want.dtype))
        if (stored.dtype in _FLOATS) != want.dtype.is_floating_point or (
                not want.dtype.is_floating_point and stored.dtype != expected):
            raise CheckpointError(f"{directory / stored.file}: {name} is {stored.dtype}; {source} expects "
                                  f"{expected}")
    missing = sorted(n for n in required - tensors.keys()
                     if not _matches(getattr(model, "_keys_to_ignore_on_load_missing", None), n))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = directory / (MANIFEST if manifest is not None else CONFIG)
        raise CheckpointError(f"{where}: the model it describes needs {missing[0]} {list(full[missing[0]].shape)}"
                              f"{more}, missing from the weights")
    extra = sorted(n for n in tensors.keys() - full.keys()
                   if not _matches(getattr(model, "_keys_to_ignore_on_load_unexpected", None), n))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{directory / tensors[extra[0]].file}: holds {extra[0]}{more}, which the model "
                              f"{source} describes does not have")
    _check_float_dtypes(directory, family, tensors, full)


def _odd_one(directory: Path, group: list[TensorInfo], what: str) -> None:
    counts: dict[str, int] = {}
    for t in group:
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    if len(counts) > 1:
        common = max(counts, key=counts.get)
        odd = next(t for t in group if t.dtype != common)
        raise CheckpointError(f"{directory / odd.file}: {odd.name} is {odd.dtype} but {counts[common]} other "
                              f"{what} are {common}; expected one dtype for all of them")


def _check_float_dtypes(directory: Path, family: Family, tensors: dict[str, TensorInfo], full: dict) -> None:
    """A relabelled tensor (same bytes, another float dtype) differs from its kind: every routed-expert tensor,
    and the same tensor in every layer and expert (names equal up to their indices), share one dtype."""
    floats = [t for name, t in sorted(tensors.items()) if not _QUANT_TENSOR.search(name) and name in full
              and full[name].dtype.is_floating_point]
    pattern = re.compile(family.checkpoint_experts)
    _odd_one(directory, [t for t in floats if pattern.search(t.name)], "routed-expert tensors")
    kinds: dict[str, list[TensorInfo]] = {}
    for t in floats:
        kinds.setdefault(re.sub(r"\.\d+\.", ".N.", t.name), []).append(t)
    for kind, group in kinds.items():
        _odd_one(directory, group, f"tensors {kind}")


# files any one of which holds a tokenizer's vocabulary (tokenizer_config.json alone does not: transformers then
# builds an empty tokenizer for some families and every text becomes no tokens)
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(directory: str | Path) -> None:
    """Refuse a checkpoint directory without tokenizer files, naming the files expected."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_VOCAB):
        raise CheckpointError(f"{directory}: no tokenizer files; expected tokenizer.json (or tokenizer.model, or "
                              f"vocab.json + merges.txt) next to the weights, to turn the text into tokens")
