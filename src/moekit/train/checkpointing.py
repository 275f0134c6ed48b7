"""Training checkpoints: checkpoint/ = model.safetensors + optimizer.safetensors + state.json, in the 1-rank
layout (expert shards gathered), written atomically by rank 0, loadable by any number of ranks.

The optimizer state is stored by parameter name (`<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`), not by
position, so it survives the change of module order between a 1-rank and an expert-parallel model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.files import MAX_JSON_BYTES, clean_stale, read_bounded, swap_in, temp_dir
from moekit.train.parallel import Runtime, full_state, local_state

# what a training directory holds; --force replaces a directory of these and nothing else
RUN_ENTRIES = frozenset({"checkpoint", "model", "tokenizer", "metrics.jsonl"})


# recipe fields left out of the saved recipe while unset, so runs that do not use them save what they always did
_OMITTED_WHEN_NONE = ("init_from", "lora_moe")


def recipe_json(recipe: Any) -> dict:
    """The recipe as saved in state.json and run.json (fields of _OMITTED_WHEN_NONE only when set)."""
    return {k: v for k, v in asdict(recipe).items() if not (k in _OMITTED_WHEN_NONE and v is None)}


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    # clones: tied parameters (embeddings / lm_head) are stored under both names, safetensors refuses shared memory
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in opt.state.items():
        for field, value in state.items():
            out[f"{names[id(p)]}.{field}"] = value.detach().clone().reshape(-1) if field == "step" else value.detach()
    return out


def write_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, recipe: Any, step: int,
                     rt: Runtime) -> None:
    """Collective: every rank calls it; rank 0 writes."""
    model_state = full_state(model, rt, _model_tensors(model))
    opt_state = full_state(model, rt, _optimizer_tensors(model, opt))
    if rt.main:
        with temp_dir(out / "checkpoint", "saving") as tmp:
            save_file(model_state, str(tmp / "model.safetensors"))
            save_file(opt_state, str(tmp / "optimizer.safetensors"))
            state = {"recipe": recipe_json(recipe), "step": step, "world": rt.world}
            (tmp / "state.json").write_text(json.dumps(state))
            swap_in(tmp, out / "checkpoint")
    rt.barrier()


def write_run_model(path: Path, model: nn.Module, recipe: Any, vocab_size: int, rt: Runtime) -> None:
    """model/ of a run with moekit layers: model.safetensors (1-rank layout) + run.json (recipe, vocabulary size),
    read back by `moekit.train.trainer.load_run`. Collective: every rank calls it; rank 0 writes."""
    state = full_state(model, rt, _model_tensors(model))
    if rt.main:
        with temp_dir(path, "saving") as tmp:
            save_file(state, str(tmp / "model.safetensors"))
            run = {"recipe": recipe_json(recipe), "vocab_size": vocab_size}
            (tmp / "run.json").write_text(json.dumps(run, indent=1))
            swap_in(tmp, path)
    rt.barrier()


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(err).split())[:200]}); expected the safetensors "
                          "file of a training checkpoint (start again with --force)") from None


def read_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime) -> None:
    """Load checkpoint/ into `model` and `opt` (this rank's shards of the experts and their optimizer state)."""
    ckpt = out / "checkpoint"
    state = local_state(model, rt, _load(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt / 'model.safetensors'}: tensors do not match the recipe's model (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); expected a checkpoint of this recipe")
    params = dict(model.named_parameters())
    path = ckpt / "optimizer.safetensors"
    for key, value in local_state(model, rt, _load(path)).items():
        name, _, field = key.rpartition(".")
        if name not in params:
            raise ConfigError(f"{path}: state for unknown parameter {name!r}")
        fits = value.numel() == 1 if field == "step" else value.shape == params[name].shape
        if field not in ("step", "exp_avg", "exp_avg_sq") or not fits or not value.is_floating_point():
            raise ConfigError(f"{path}: {key} is {value.dtype} {list(value.shape)}; expected AdamW state "
                              f"(step, exp_avg, exp_avg_sq) shaped like the parameter {list(params[name].shape)}")
        opt.state[params[name]][field] = value.reshape(()) if field == "step" else value.clone()


def _read_state(state_file: Path, recipe: Any) -> int:
    try:
        state = json.loads(read_bounded(state_file, MAX_JSON_BYTES, "state.json", ConfigError))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{state_file}: not JSON ({err}); expected the state of a training checkpoint (start "
                          "again with --force)") from None
    step = state.get("step") if isinstance(state, dict) else None
    saved = state.get("recipe") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or not isinstance(step, int) or isinstance(step, bool) \
            or not 0 <= step <= recipe.steps:
        raise ConfigError(f"{state_file}: expected an object with a recipe object and a step in [0, "
                          f"{recipe.steps}] (start again with --force)")
    if saved != json.loads(json.dumps(recipe_json(recipe))):
        raise ConfigError(f"{state_file}: recipe {saved.get('name')!r} with other settings; expected recipe "
                          f"{recipe.name!r} as saved to resume it")
    for name in ("model.safetensors", "optimizer.safetensors"):
        path = state_file.parent / name
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{path}: cannot be read ({' '.join(str(err).split())[:200]}); expected the "
                              "safetensors file of a training checkpoint (start again with --force)") from None
    return step


def check_out_dir(out: Path, recipe: Any, resume: bool, force: bool = False) -> int:
    """The step to start from, checked before anything is written: `resume` needs a readable checkpoint of the same
    recipe; a fresh run needs an absent or empty directory, or `force` and a training directory (its entries are
    removed); both clean what an interrupted run left (temporaries, a half-swapped checkpoint)."""
    if resume and force:
        raise ConfigError("--resume and --force: expected one of them (continue the run, or start it again)")
    for name in ("checkpoint", "model"):
        clean_stale(out / name)
    state_file = out / "checkpoint" / "state.json"
    if resume:
        if not state_file.exists():
            started = out.is_dir() and any(out.iterdir())
            raise ConfigError(f"{out}: no checkpoint/state.json to resume" + (
                " (the run stopped before its first checkpoint); expected --force to start it again" if started
                else "; expected a training directory"))
        return _read_state(state_file, recipe)
    if out.is_dir() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if not force:
            raise ConfigError(f"{out}: directory is not empty; expected a new --out (or --resume to continue the "
                              "run, or --force to start it again)")
        if not names <= RUN_ENTRIES:
            other = sorted(names - RUN_ENTRIES)
            raise ConfigError(f"{out}: holds {', '.join(other[:3])}, not a training directory; --force replaces "
                              f"only {', '.join(sorted(RUN_ENTRIES))}")
    return 0


def clear_run(out: Path) -> None:
    """Remove a training directory's entries (what `--force` replaces), each by a rename first so that a kill
    leaves a temporary that the next run removes, never a half-deleted checkpoint."""
    for name in sorted(RUN_ENTRIES):
        path = out / name
        if path.is_dir():
            doomed = out / f".{name}.removing-{os.getpid()}-0"
            path.rename(doomed)
            shutil.rmtree(doomed)
        elif path.exists():
            path.unlink()
