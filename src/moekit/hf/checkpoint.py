"""`load(path)` and `save(model, out_dir)`: checked, atomic, safetensors-only checkpoints of a supported family.

`load` checks the directory before transformers reads a weight (config.json parses and names an MoE family, every
shard exists, every safetensors header fits its file), then loads with transformers and refuses any tensor the
config did not expect, expected but did not get, or expected with another shape.
`save` writes the family's native layout (loadable by plain `AutoModelForCausalLM.from_pretrained`), or for a model
whose layers no longer fit the config a manifest checkpoint (`moekit.hf.manifest`), into a temporary sibling
directory and renames it into place, so `out_dir` never holds half a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from moekit.hf.families import family_of
from moekit.hf.headers import CheckpointError, read_checkpoint
from moekit.hf.manifest import (
    MANIFEST,
    check_float_experts,
    layer_shapes,
    load_manifest,
    quantized_layers,
    save_manifest,
)

CONFIG = "config.json"


def read_config(directory: Path):
    """The transformers config of a checkpoint directory (config.json only), with its family checked."""
    from transformers import AutoConfig

    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a transformers config.json in the checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 (json, validation and hub errors share no base class)
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path}: cannot be read as a transformers config: {reason}") from None
    family_of(config, source=str(path))
    return config


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
    config = read_config(directory)
    if (directory / MANIFEST).exists():
        return load_manifest(directory, config, dtype, **kwargs)
    read_checkpoint(directory)
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
    out = Path(out_dir).resolve()
    source = _source_dir(model)
    if source is not None and (out == source or out in source.parents):
        raise CheckpointError(f"{out_dir}: is the directory the model was loaded from ({source}); expected "
                              f"another output directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; expected a directory to save into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out_dir}: not empty; expected an empty or new directory (or force=True)")
    check_float_experts(model)
    native = not layer_shapes(model) and not quantized_layers(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
    try:
        if native:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            save_manifest(model, tmp, max_shard_size)
        read_checkpoint(tmp)  # what was written has whole headers and all its shards
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and put back if the rename fails."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)
