"""Merging LoRA adapters: the exact sum (Orthogonal Adaptation's merge) and PEFT's `add_weighted_adapter` methods
as baselines.

Orthogonal Adaptation (Po et al.): each adapter i is trained with a fixed, frozen A_i made of rows of one random
orthogonal matrix Q shared by every adapter (rows [i·r, (i+1)·r) of Q for slot i); only B_i trains. Then
A_i A_jᵀ = 0 for i ≠ j, so the summed update ΣΔW_j = Σ s_j B_j A_j acts on an input x in adapter i's subspace
(the row space of A_i) exactly as adapter i alone: ΣΔW_j x = s_i B_i A_i x. The sum is itself a LoRA of rank Σr
(A stacked, B side by side), so it is saved as a PEFT adapter and loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compose.adapters import (
    AdapterError,
    LoraAdapter,
    check_against_model,
    check_output,
    check_same_shapes,
    load_base,
    lora_tensors,
    read_pool,
    write_adapter,
)
from moekit.errors import UnknownNameError
from moekit.files import swap_in, temp_dir

PEFT_METHODS = ("linear", "ties", "dare_linear", "svd", "cat")
METHODS = ("sum", *PEFT_METHODS)  # sum: the exact sum of the updates (Orthogonal Adaptation's merge)
SAME_RANK = ("linear", "ties", "dare_linear")


def check_method(method: str, flag: str = "--method") -> None:
    if method not in METHODS:
        raise UnknownNameError(f"{flag} {method}: unknown merge method; expected one of {', '.join(METHODS)}")


# --- Orthogonal Adaptation: fixed orthogonal A per adapter -------------------------------------------------------

def orthogonal_rows(in_features: int, rank: int, slot: int, slots: int, seed: int) -> Tensor:
    """Rows [slot·rank, (slot+1)·rank) of a random orthogonal [in, in] matrix drawn from `seed` (the same matrix for
    every slot): A for adapter `slot`, [rank, in]."""
    if slots * rank > in_features:
        raise AdapterError(f"{slots} orthogonal adapters of rank {rank} need {slots * rank} directions; a layer has "
                           f"only {in_features} inputs (expected slots x rank <= in_features)")
    if not 0 <= slot < slots:
        raise AdapterError(f"slot {slot}: expected 0 <= slot < {slots}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(in_features, in_features, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a unique Q for the seed (Haar-distributed)
    return q.T[slot * rank:(slot + 1) * rank].float().contiguous()


def make_orthogonal(peft_model: nn.Module, slot: int, slots: int, seed: int = 0, adapter_name: str = "default") -> int:
    """Set every LoRA layer's A of `adapter_name` to its slot's orthogonal rows and freeze it (only B trains).
    The matrix is drawn from (seed, the module's name), so adapters trained apart agree on it. Returns the number
    of layers set."""
    count = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        weight = lora_a[adapter_name].weight
        rows = orthogonal_rows(weight.shape[1], weight.shape[0], slot, slots,
                               seed * 1_000_003 + zlib.crc32(name.encode()))
        with torch.no_grad():
            weight.copy_(rows.to(weight.dtype))
        weight.requires_grad_(False)
        count += 1
    if count == 0:
        raise AdapterError(f"adapter {adapter_name!r}: no LoRA layer found; expected a PEFT LoRA model")
    return count


def train_orthogonal_lora(model: nn.Module, windows: Tensor, out: str | os.PathLike, slot: int, slots: int,
                          targets: list[str], rank: int = 8, alpha: float = 16.0, steps: int = 100, lr: float = 1e-3,
                          batch_size: int = 8, seed: int = 0, basis_seed: int = 0, progress: bool = True,
                          base_path: str | None = None) -> dict:
    """Train one LoRA with A fixed to its slot's orthogonal rows (only B trains) on windows [N, L]; saved as a
    PEFT adapter at `out`. The model is wrapped in place and unwrapped at the end (its weights unchanged)."""
    from peft import LoraConfig, get_peft_model

    from moekit.compose.loop import fit

    final = check_output(out, [base_path] if base_path else [], flag="--out", error=AdapterError)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                  lora_dropout=0.0, bias="none"))
    if base_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    try:
        layers = make_orthogonal(peft_model, slot, slots, basis_seed)
        trained = fit(peft_model, windows, peft_model.parameters(), steps, lr, batch_size, seed, progress=progress,
                      desc=f"orthogonal lora {slot}")
        with temp_dir(final, "lora") as tmp:
            peft_model.save_pretrained(str(tmp))
            swap_in(tmp, final)
    finally:
        peft_model.unload()
    return {"out": str(final), "slot": slot, "slots": slots, "layers": layers, "rank": rank,
            "first_loss": trained["first_loss"], "last_loss": trained["last_loss"]}


# --- merging ------------------------------------------------------------------------------------------------------

def sum_adapters(adapters: list[LoraAdapter], weights: list[float] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of the LoRA whose update is Σ w_i ΔW_i exactly: per module A = [A_1; A_2; ...],
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scaling 1 (lora_alpha = r; per-module ranks in rank_pattern)."""
    weights = weights or [1.0] * len(adapters)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for m, (a, b, s) in adapter.modules().items():
            parts.setdefault(m, []).append((a.float(), b.float() * (w * s)))
    modules = {m: (torch.cat([a for a, _ in ab]), torch.cat([b for _, b in ab], dim=1)) for m, ab in parts.items()}
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    r = max(ranks.values())
    pattern = {_peft_pattern(m): k for m, k in ranks.items() if k != r}
    config = {**adapters[0].config, "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "use_rslora": False, "target_modules": _union_targets(adapters)}
    return config, lora_tensors(modules)


def _peft_pattern(module: str) -> str:
    """A rank_pattern key PEFT matches to exactly this module (its name without the base_model.model. prefix)."""
    return module.removeprefix("base_model.model.")


def _union_targets(adapters: list[LoraAdapter]):
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in targets):
        return sorted({x for t in targets for x in t})
    return targets[0]


def peft_merge(peft_model: nn.Module, names: list[str], method: str, weights: list[float], density: float = 0.5,
               svd_rank: int | None = None, merged: str = "merged") -> nn.Module:
    """PEFT's add_weighted_adapter over adapters already loaded into `peft_model`; the result is adapter `merged`."""
    check_method(method)
    if method == "sum":
        raise AdapterError("method sum: use sum_adapters (exact) rather than PEFT's add_weighted_adapter")
    kwargs = {"density": density} if method in ("ties", "dare_linear") else {}
    if method == "svd" and svd_rank is not None:
        kwargs["svd_rank"] = svd_rank
    peft_model.add_weighted_adapter(names, weights, merged, combination_type=method, **kwargs)
    return peft_model


def merge_adapters(paths: list[str | os.PathLike], method: str, out: str | os.PathLike,
                   model: str | os.PathLike | None = None, weights: list[float] | None = None, density: float = 0.5,
                   svd_rank: int | None = None) -> dict:
    """`moekit lora merge`: merge the adapters at `paths` with `method` into a PEFT adapter at `out`, checked
    against the base model (None: the default model). Checks run before any work; returns a report."""
    check_method(method)
    adapters = read_pool(paths)
    check_output(out, paths, flag="--out", error=AdapterError)
    if weights is not None and len(weights) != len(adapters):
        raise AdapterError(f"--weight: {len(weights)} weights for {len(adapters)} adapters; expected one per adapter")
    if not 0 < density <= 1:
        raise AdapterError(f"--density={density}: expected a fraction in (0, 1]")
    fused = [a.path for a in adapters if a.config.get("target_parameters")]
    if fused:
        raise AdapterError(f"{fused[0]}: LoRA on fused expert parameters (target_parameters); expected adapters on "
                           f"linear layers (a merge of per-expert stacked factors is not a LoRA of them)")
    check_same_shapes(adapters, same_rank=method in SAME_RANK)
    model_path, base, _ = load_base(model)
    for a in adapters:
        check_against_model(a, base, str(model_path))
    weights = weights or [1.0] * len(adapters)
    if method == "sum":
        config, tensors = sum_adapters(adapters, weights)
    else:
        config, tensors = peft_merged(base, adapters, method, weights, density, svd_rank)
    config = {**config, "base_model_name_or_path": str(model_path)}
    final = write_adapter(out, config, tensors, paths)
    return {"method": method, "adapters": [str(p) for p in paths], "weights": weights, "out": str(final),
            "rank": config["r"], "modules": len({k.rsplit(".lora_", 1)[0] for k in tensors}),
            "parameters": sum(t.numel() for t in tensors.values())}


def peft_merged(base: nn.Module, adapters: list[LoraAdapter], method: str, weights: list[float], density: float,
                 svd_rank: int | None) -> tuple[dict, dict[str, Tensor]]:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base, adapters[0].path, adapter_name=names[0])
    for name, a in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(a.path, adapter_name=name)
    try:
        peft_merge(peft_model, names, method, weights, density, svd_rank)
        config = peft_model.peft_config["merged"].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        tensors = get_peft_model_state_dict(peft_model, adapter_name="merged")
        return config, {k: v.detach().float().clone() for k, v in tensors.items()}
    finally:
        peft_model.unload()  # `base` gets its plain layers back


def merged_delta(config: dict, tensors: dict[str, Tensor], module: str) -> Tensor:
    """ΔW of `module` in a merged adapter given as (config, tensors), as PEFT would apply it."""
    return LoraAdapter(Path("."), config, tensors).deltas()[module]
