"""Composable Sparse Fine-Tuning (Ansell et al., LT-SFT): a sparse difference φ with θ = θ0 + φ, found the lottery
ticket way: (1) fine-tune the chosen weights for a few steps; (2) keep, per tensor, the `density` fraction of entries
that moved most, |θ1 - θ0|; (3) reset to θ0 and fine-tune again with only those entries free. Differences trained
apart compose by addition: θ0 + φ_1 + φ_2 (sparsity keeps their overlap, hence their interference, small).

A difference is stored as safetensors: per tensor `NAME.idx` (int64 flat indices) and `NAME.val`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.compose.adapters import AdapterError
from moekit.compose.loop import lm_loss
from moekit.files import check_output

SparseDiff = dict[str, tuple[Tensor, Tensor]]  # parameter name -> (flat indices [k], values [k])


def default_params(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Weights of the nn.Linear modules whose name ends with one of `targets`."""
    targets = tuple(targets)
    names = [f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not names:
        raise AdapterError(f"target modules {list(targets)}: none found among the model's linear layers")
    return names


def _train(model: nn.Module, params: dict[str, nn.Parameter], batches: list[Tensor], steps: int, lr: float,
           masks: dict[str, Tensor] | None, start: dict[str, Tensor], desc: str,
           loss_fn: Callable[[nn.Module, Tensor], Tensor], progress: bool = True) -> None:
    opt = torch.optim.Adam(params.values(), lr=lr)  # no weight decay: untouched entries stay exactly at θ0
    model.train()
    for step in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not progress):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batches[step % len(batches)]).backward()
        if masks is not None:
            for name, p in params.items():
                p.grad.mul_(masks[name])
        opt.step()
        if masks is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(torch.where(masks[name], p, start[name]))
    model.eval()


def sparse_fine_tune(model: nn.Module, batches: list[Tensor], param_names: list[str], density: float,
                     steps: int = 50, lr: float = 1e-3, loss_fn: Callable = lm_loss, progress: bool = True
                     ) -> SparseDiff:
    """LT-SFT on `param_names` of `model`; the model is left as it was (θ0) and the sparse difference returned."""
    if not 0 < density <= 1:
        raise AdapterError(f"density={density}: expected a fraction in (0, 1]")
    if not batches or steps < 1:
        raise AdapterError(f"{len(batches)} batches, {steps} steps: expected some data and at least one step")
    named = dict(model.named_parameters())
    missing = [n for n in param_names if n not in named]
    if missing:
        raise AdapterError(f"parameters {missing[:3]}: not in the model; expected names from named_parameters()")
    params = {n: named[n] for n in param_names}
    frozen = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in params)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    try:
        _train(model, params, batches, steps, lr, None, theta0, "sft: full", loss_fn, progress)
        masks = {}
        for n, p in params.items():
            moved = (p.detach() - theta0[n]).abs().reshape(-1)
            k = max(1, round(density * moved.numel()))
            mask = torch.zeros_like(moved, dtype=torch.bool)
            mask[torch.topk(moved, k).indices] = True
            masks[n] = mask.reshape(p.shape)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n])
        _train(model, params, batches, steps, lr, masks, theta0, "sft: on mask", loss_fn, progress)
        diff = {}
        with torch.no_grad():
            for n, p in params.items():
                idx = torch.nonzero(masks[n].reshape(-1)).reshape(-1)
                diff[n] = (idx, (p.detach() - theta0[n]).reshape(-1)[idx].clone())
                p.copy_(theta0[n])
    finally:
        for n, p in named.items():
            p.requires_grad_(frozen[n])
    return diff


@torch.no_grad()
def apply_sparse(model: nn.Module, diffs: list[SparseDiff], sign: float = 1.0) -> None:
    """θ += sign · Σ φ_i in place (sign -1 undoes it)."""
    named = dict(model.named_parameters())
    for diff in diffs:
        for n, (idx, val) in diff.items():
            if n not in named:
                raise AdapterError(f"sparse difference: parameter {n} not in the model; expected the same base model")
            named[n].view(-1).index_add_(0, idx, sign * val.to(named[n].dtype))


def save_sparse(diff: SparseDiff, out: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    from moekit.files import atomic_write

    path = check_output(out, directory=False, error=AdapterError)
    tensors = {f"{n}.{part}": t.contiguous() for n, (idx, val) in diff.items()
               for part, t in (("idx", idx), ("val", val))}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    try:
        atomic_write(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_sparse(path: str | os.PathLike) -> SparseDiff:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: cannot read ({e}); expected a sparse difference in safetensors") from None
    names = {k.rsplit(".", 1)[0] for k in raw}
    return {n: (raw[f"{n}.idx"], raw[f"{n}.val"]) for n in names}
