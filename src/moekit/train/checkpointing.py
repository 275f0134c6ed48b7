"""Training checkpoints: checkpoint/ = model.safetensors + optimizer.safetensors + state.json, in the 1-rank
layout (expert shards gathered), written atomically by rank 0, loadable by any number of ranks.

The optimizer state is stored by parameter name (`<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`), not by
position, so it survives the change of module order between a 1-rank and an expert-parallel model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.train.parallel import Runtime, full_state, local_state


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
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-"))
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(opt_state, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"recipe": asdict(recipe), "step": step, "world": rt.world}))
        _replace_dir(tmp, out / "checkpoint")
    rt.barrier()


def write_run_model(path: Path, model: nn.Module, recipe: Any, vocab_size: int, rt: Runtime) -> None:
    """model/ of a run with moekit layers: model.safetensors (1-rank layout) + run.json (recipe, vocabulary size),
    read back by `moekit.train.trainer.load_run`. Collective: every rank calls it; rank 0 writes."""
    state = full_state(model, rt, _model_tensors(model))
    if rt.main:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "run.json").write_text(json.dumps({"recipe": asdict(recipe), "vocab_size": vocab_size}, indent=1))
        _replace_dir(tmp, path)
    rt.barrier()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` (absent or an earlier version), by renames."""
    if final.exists():
        old = final.with_name(f".{final.name}-old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def read_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime) -> None:
    """Load checkpoint/ into `model` and `opt` (this rank's shards of the experts and their optimizer state)."""
    ckpt = out / "checkpoint"
    state = local_state(model, rt, load_file(str(ckpt / "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt / 'model.safetensors'}: tensors do not match the recipe's model (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); expected a checkpoint of this recipe")
    params = dict(model.named_parameters())
    for key, value in local_state(model, rt, load_file(str(ckpt / "optimizer.safetensors"))).items():
        name, field = key.rsplit(".", 1)
        if name not in params:
            raise ConfigError(f"{ckpt / 'optimizer.safetensors'}: state for unknown parameter {name!r}")
        opt.state[params[name]][field] = value.reshape(()) if field == "step" else value.clone()


def check_out_dir(out: Path, recipe: Any, resume: bool) -> int:
    """The step to start from; refuses a non-empty directory without `resume` and another recipe's directory."""
    state_file = out / "checkpoint" / "state.json"
    if resume:
        if not state_file.exists():
            raise ConfigError(f"{out}: expected a training directory with checkpoint/state.json to resume")
        state = json.loads(state_file.read_text())
        saved = state["recipe"]
        if saved != json.loads(json.dumps(asdict(recipe))):
            raise ConfigError(f"{state_file}: recipe {saved.get('name')!r} with other settings; expected recipe "
                              f"{recipe.name!r} as saved to resume it")
        return int(state["step"])
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: directory is not empty; expected a new --out (or --resume to continue it)")
    return 0
