"""Compressed experts on a transformers MoE checkpoint (`moekit compress MODEL --method compressed-experts`).

Each MoE block's experts module is wrapped by `CompressedHFExperts`: of a token's k routed experts, ranked by the
family's own routing weight, the `keep` heaviest run in full and the others as their compressed forms
C_e(x) = B_e A_e x + c_e + D_e gelu(U_e x) (`moekit.compress.compressed_experts`, fitted on the calibration tokens'
block inputs), each still weighted by the router's weight:

    y = sum_{rank(j) < keep} w_j E_{i_j}(x) + sum_{rank(j) >= keep} w_j C_{i_j}(x)   (+ shared experts, unchanged)

The full experts stay as they are, so the checkpoint is written natively (plain transformers loads the uncompressed
model) and the compressed experts beside it: `compressed_experts.safetensors` (tensors `layers.{L}.{a,b,c,u,d}`)
and `compressed_experts.json` (keep, rank, layers); `load_compressed(model, directory)` puts them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.compress.calibrate import Stats
from moekit.compress.compressed_experts import CompressedExpertsConfig, compressed_output, fit_compressed
from moekit.core.experts.qformat import QuantizedExperts
from moekit.core.experts.ragged import RaggedExperts
from moekit.errors import ConfigError
from moekit.hf.headers import CheckpointError
from moekit.hf.view import BlockView, HFExperts, view

SIDECAR = "compressed_experts.safetensors"
SIDECAR_JSON = "compressed_experts.json"
NAMES = ("a", "b", "c", "u", "d")
MAX_TOKENS = 4096


class CompressedHFExperts(nn.Module):
    """A transformers experts module whose auxiliary selections run compressed (module docstring). Reads the
    original module's attributes through (`gate_up_proj`, ...), so `moekit.hf.view` still sees the full experts."""

    def __init__(self, inner: nn.Module, view_experts: HFExperts, keep: int, params: dict[str, Tensor]):
        super().__init__()
        self.inner, self.keep = inner, keep
        self._view = view_experts
        for name in NAMES:
            self.register_parameter(name, nn.Parameter(params[name].to(inner.down_proj.dtype), requires_grad=False))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def compressed(self, x: Tensor, e: int) -> Tensor:
        return compressed_output(x, self.a[e], self.b[e], self.c[e], self.u[e], self.d[e])

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden [T, H], top_k_index / top_k_weights [T, k] (in any slot order) -> [T, H]."""
        order = torch.argsort(top_k_weights.float(), dim=-1, descending=True, stable=True)
        full = torch.argsort(order, dim=-1) < self.keep  # [T, k]: the slot is among the token's keep heaviest
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self._view.num_experts:
                continue  # a family's "no expert" sentinel
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            w = top_k_weights[tok, slot].unsqueeze(-1)
            is_full = full[tok, slot]
            for mask, run in ((is_full, self._view.expert), (~is_full, self.compressed)):
                if mask.any():
                    part = run(hidden_states[tok[mask]], e)
                    out.index_add_(0, tok[mask], (w[mask].to(part.dtype) * part).to(out.dtype))
        return out


def _check_block(block: BlockView, keep: int) -> None:
    if isinstance(block.experts.module, (QuantizedExperts, RaggedExperts, CompressedHFExperts)):
        raise ConfigError(f"layer {block.layer}: --method compressed-experts expects full-width float experts; got "
                          f"{type(block.experts.module).__name__}")
    if not 1 <= keep < block.k:
        raise ConfigError(f"--keep {keep}: expected from 1 to k - 1 = {block.k - 1} (layer {block.layer} routes "
                          f"{block.k} experts per token)")


def install(block: BlockView, keep: int, params: dict[str, Tensor]) -> CompressedHFExperts:
    """Wrap `block`'s experts module with compressed forms `params` ({a, b, c, u, d} stacked over experts)."""
    wrapper = CompressedHFExperts(block.experts.module, block.experts, keep, params)
    setattr(block.block, block.family.experts, wrapper)
    return wrapper


def uninstall(model: nn.Module) -> dict[int, dict[str, Tensor]]:
    """Put every wrapped block's original experts module back; returns the compressed tensors by layer."""
    found = {}
    for b in view(model):
        module = b.experts.module
        if isinstance(module, CompressedHFExperts):
            found[b.layer] = {n: getattr(module, n).detach() for n in NAMES}
            setattr(b.block, b.family.experts, module.inner)
    return found


def compress_experts(model: nn.Module, stats: Stats, keep: int = 1, rank: int = 8, steps: int = 200,
                     lr: float = 1e-2, progress: bool = True, seed: int = 0) -> dict:
    """Fit and install compressed experts in every MoE block of `model` (in place). Returns {"keep", "rank",
    "steps", "layers": {layer: {"full_mse", "compressed_mse", "mean_mse"}}}: the mean squared error of each
    form to the experts' outputs on the calibration inputs (averaged over experts; full_mse is 0 by definition,
    mean_mse that of the mean-output baseline)."""
    blocks = view(model)
    config = CompressedExpertsConfig(keep=keep, rank=rank, steps=steps, lr=lr)
    for b in blocks:
        _check_block(b, keep)
        config.check(b.k, b.experts.hidden_size)
    by_layer = {s.layer: s for s in stats.layers}
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for b in tqdm(blocks, desc="compressed experts", unit="layer", disable=not progress, leave=False):
        x = by_layer[b.layer].x
        if len(x) > MAX_TOKENS:
            x = x[torch.randperm(len(x), generator=g)[:MAX_TOKENS]]
        dtype = b.experts.down_proj.dtype

        def expert(t: Tensor, e: int, b=b, dtype=dtype) -> Tensor:
            return b.experts.expert(t.to(dtype), e).float()

        fitted = fit_compressed(x, expert, b.num_experts, config, generator=g)
        with torch.no_grad():
            x32 = x.float()
            errs = [(expert(x32, e), compressed_output(x32, *(fitted[n][e] for n in NAMES)), fitted["mean"][e])
                    for e in range(b.num_experts)]
        layers[b.layer] = {"full_mse": 0.0,
                           "compressed_mse": sum(float((c - y).square().mean()) for y, c, _ in errs) / len(errs),
                           "mean_mse": sum(float((m - y).square().mean()) for y, _, m in errs) / len(errs)}
        install(b, keep, fitted)
    return {"keep": keep, "rank": rank, "steps": steps, "layers": layers}


def active_params_saved(model: nn.Module, keep: int, rank: int) -> int:
    """Parameters per token no longer used: per MoE block (k - keep) (P - (4 r H + H)), P an expert's size."""
    saved = 0
    for b in view(model):
        per_expert = sum(p[0].numel() for p in (b.experts.gate_up_proj, b.experts.down_proj))
        per_expert += sum(p[0].numel() for p in (b.experts.gate_up_proj_bias, b.experts.down_proj_bias)
                          if p is not None)
        saved += (b.k - keep) * (per_expert - (4 * rank * b.experts.hidden_size + b.experts.hidden_size))
    return saved


def write_sidecar(directory: Path, tensors: dict[int, dict[str, Tensor]], keep: int, rank: int) -> None:
    from safetensors.torch import save_file

    flat = {f"layers.{layer}.{n}": t.contiguous() for layer, d in tensors.items() for n, t in d.items()}
    save_file(flat, str(directory / SIDECAR))
    (directory / SIDECAR_JSON).write_text(json.dumps({
        "keep": keep, "rank": rank, "layers": sorted(tensors),
        "apply": "moekit.compress.compressed_hf.load_compressed(model, directory)"}, indent=1))


def load_compressed(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Install the compressed experts saved in `directory` (by `moekit compress --method compressed-experts`) into
    `model` (that checkpoint, loaded); returns `model`."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (SIDECAR_JSON, SIDECAR):
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name}: missing; expected the output of moekit compress --method "
                                  "compressed-experts")
    try:
        meta = json.loads((d / SIDECAR_JSON).read_text())
        keep, layers = int(meta["keep"]), [int(x) for x in meta["layers"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{d / SIDECAR_JSON}: expected JSON with keep, rank and layers") from None
    tensors = load_file(str(d / SIDECAR))
    blocks = {b.layer: b for b in view(model)}
    for layer in layers:
        if layer not in blocks:
            raise CheckpointError(f"{d / SIDECAR_JSON}: layer {layer} is not an MoE layer of the model")
        try:
            params = {n: tensors[f"layers.{layer}.{n}"] for n in NAMES}
        except KeyError as err:
            raise CheckpointError(f"{d / SIDECAR}: no tensor {err.args[0]}") from None
        _check_block(blocks[layer], keep)
        install(blocks[layer], keep, params)
    return model
