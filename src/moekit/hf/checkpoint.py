"""`load(path)` and `save(model, out_dir)`: checked, atomic, safetensors-only checkpoints of a supported family.

`load` checks the directory before any model object is built (`moekit.hf.validate.check_checkpoint`: config.json
against every safetensors header, so every tensor the config describes is stored with its shape and a fitting
dtype), then loads with transformers and again refuses any tensor the config did not expect, expected but did not
get, or expected with another shape.
`save` writes the family's native layout (loadable by plain `AutoModelForCausalLM.from_pretrained`), or for a model
whose layers no longer fit the config a manifest checkpoint (`moekit.hf.manifest`), into a temporary sibling
directory and renames it into place, so `out_dir` never holds half a checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from moekit.files import check_output, clean_stale, swap_in, temp_dir
from moekit.hf.families import family_of
from moekit.hf.headers import CheckpointError, read_checkpoint
from moekit.hf.manifest import (
    check_float_experts,
    layer_shapes,
    load_manifest,
    prune_auto_map,
    quantized_layers,
    save_manifest,
)
from moekit.hf.validate import CONFIG, check_checkpoint


def _check_loading_info(directory: Path, info: dict) -> None:
    config = directory / CONFIG
    if info.get("mismatched_keys"):
        key, ckpt_shape, model_shape = next(iter(info["mismatched_keys"]))
        raise CheckpointError(f"{config}: shapes disagree with the weights: {key} is {list(ckpt_shape)} in the "
                              f"checkpoint, the config expects {list(model_shape)}")
    for what, keys in (("missing from the weights", "missing_keys"), ("in the weights but not in the config",
                                                                      "unexpected_keys")):
        names = sorted(info.get(keys) or ())
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{config}: disagrees with the weights in {directory}: {names[0]}{more} {what}")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """A causal LM of a supported MoE family from a local checkpoint directory (a hub id only when online), in
    eval mode; `dtype` defaults to the checkpoint's, other keywords (`attn_implementation`, ...) go to
    `from_pretrained`. Raises CheckpointError (a MoekitError) naming the file and what was expected."""
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        if directory.exists() or offline or str(path).count("/") != 1:
            raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + safetensors)"
                                  + (", and HF_HUB_OFFLINE is set so hub ids are not fetched" if offline else ""))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", **kwargs)
        family_of(model.config, source=str(path))
        return model.eval()
    checked = check_checkpoint(directory)
    if checked.manifest is not None:
        return load_manifest(directory, checked.config, dtype, checked.manifest, checked.tensors, **kwargs)
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto", output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
    _check_loading_info(directory, info)
    return model.eval()


def _source_dir(model: nn.Module) -> Path | None:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(name).resolve() if name and Path(name).is_dir() else None


def save(model: nn.Module, out_dir: str | os.PathLike, force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Save `model` to `out_dir` atomically, as safetensors sharded above `max_shard_size`: in its family's native
    layout when every MoE layer has the config's expert count and width and float experts, else with a moekit
    manifest and a modeling file (see `moekit.hf.manifest`). `out_dir` may not be (or contain) the directory the
    model was loaded from, and must be empty unless `force`. Returns the output directory."""
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None \
            or not hasattr(model, "save_pretrained"):
        raise CheckpointError(f"model: a {type(model).__name__}; expected a transformers causal LM of a supported MoE "
                              "family (as moekit.hf.load returns)")
    _check_shard_size(max_shard_size)
    out = Path(out_dir).resolve()
    source = _source_dir(model)
    if source is not None and (out == source or out in source.parents or source in out.parents):
        raise CheckpointError(f"{out_dir}: is the directory the model was loaded from ({source}), holds it or lies "
                              "inside it; expected another output directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; expected a directory to save into")
    check_output(out, flag="out_dir")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out_dir}: not empty; expected an empty or new directory (or force=True)")
    check_float_experts(model)
    native = not layer_shapes(model) and not quantized_layers(model)
    clean_stale(out)
    with temp_dir(out, "saving") as tmp:
        if native:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            save_manifest(model, tmp, str(max_shard_size))
        prune_auto_map(tmp, out)  # a source's auto_map names modules the output does not hold
        read_checkpoint(tmp)  # what was written has whole headers and all its shards
        swap_in(tmp, out)
    return out


def _check_shard_size(size: object) -> None:
    """max_shard_size: a positive number of bytes, or a string such as "2GB", "500MB", "1GiB"."""
    ok = isinstance(size, int) and not isinstance(size, bool) and size > 0
    if isinstance(size, str):  # what transformers' save_pretrained parses: whole number, unit
        m = re.fullmatch(r"(\d+)([KMG]i?B)", size, flags=re.IGNORECASE)
        ok = m is not None and int(m.group(1)) > 0
    if not ok:
        raise CheckpointError(f"max_shard_size={size!r}: expected a positive number of bytes or a whole number with "
                              "a unit, such as '2GB', '500MB' or '1GiB'")
