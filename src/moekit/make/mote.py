"""MoTE upcycling of a dense checkpoint: `moekit make DENSE --method mote --experts E [--k 1] [--mote-init copy]`.

MoTE (Mixture of Ternary Experts) keeps the pre-trained FFN, in full precision and frozen, as a shared expert and
adds routed experts initialised from the same dense checkpoint whose weights are ternary, trained quantization-aware
(straight-through). Each MoE layer of the written model (DeepSeek-V3 from a dense DeepSeek-V3, Qwen2-MoE from a
Qwen2: the families with a shared expert) is

    y = FFN(x) + sum_{e in topk(x)} g_e(x) T_e(x),   T_e: W -> clamp(round(W / s), -1, 1) s per group of
                                                      `group_size` inputs of a row, s = mean |W| over the group,

the quantizer moekit's ternary storage uses (`core/experts/qformat.py`: float16 scales), so every routed weight takes
values in {-s, 0, s} within its group. `init`:
- `copy` (the paper: all experts initialised from the dense checkpoint): the latent routed experts are copies of the
  FFN, the chosen ones' weights summing to 1 (the down projections divided by DeepSeek-V3's routed_scaling_factor),
  so at step 0 y = FFN(x) + T(FFN)(x);
- `zero`: the same copies with zero down projections, so at step 0 y = FFN(x) exactly (the dense model's output) and
  training grows the routed contribution from nothing.
The router is random (normal, std `init_std`). The checkpoint is a plain family checkpoint (transformers loads it
without remote code) whose routed experts hold the ternary values; `mote.json` (group size, init) and
`mote_latent.safetensors` (the full-precision latent weights the straight-through estimator trains) sit beside it.
`moekit make finetune OUT` sees `mote.json` and trains as the paper does (`ternary_training`): the latent weights
get the gradients of their ternary values, only the routers and the routed experts train, and the result is
written back the same way. The ternary values are stored as floats (the family's own format; packing them 2 bits a
weight is `--quant ternary` on a model holding the latent weights, as `compress --method mote` does).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compress.mote_hf import ternary_as_stored
from moekit.errors import ConfigError
from moekit.make.convert import convert, ffn, routed_scale, shared_scale, shared_tensors, target_of, upcycled_tensors

INITS = ("copy", "zero")
MANIFEST = "mote.json"
LATENT = "mote_latent.safetensors"
_NAMES = ("gate_up_proj", "down_proj")


def ternary(w: Tensor, transposed: bool, group_size: int) -> Tensor:
    """A fused [E, out, in] expert weight ([E, in, out] when `transposed`) -> its ternary values as moekit's storage
    encodes them (groups along each row's inputs), same shape and dtype."""
    oriented = w.transpose(1, 2) if transposed else w
    q = ternary_as_stored(oriented, group_size)
    return (q.transpose(1, 2) if transposed else q).to(w.dtype)


class _StraightThrough(nn.Module):
    """Parametrization: the forward pass sees the ternary value of the latent weight, the backward pass the identity."""

    def __init__(self, transposed: bool, group_size: int):
        super().__init__()
        self.transposed, self.group_size = transposed, group_size

    def forward(self, w: Tensor) -> Tensor:
        return w + (ternary(w.detach(), self.transposed, self.group_size) - w).detach()


def check_settings(experts: int, k: int, init: str, group_size: int) -> None:
    if init not in INITS:
        raise ConfigError(f"--mote-init={init!r}: expected one of {', '.join(INITS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 4 or group_size % 4:
        raise ConfigError(f"--group-size={group_size!r}: expected a positive multiple of 4")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ConfigError(f"--experts={experts!r}: expected a positive integer")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ConfigError(f"--k={k!r}: expected an integer in 1..experts={experts}")


@torch.no_grad()
def mote_upcycle(model: nn.Module, experts: int, k: int = 1, init: str = "copy", group_size: int = 64,
                 layers: Sequence[int] | None = None, seed: int = 0, init_std: float = 0.02
                 ) -> tuple[nn.Module, dict, dict[int, dict[str, Tensor]]]:
    """The MoTE model of a dense decoder (see the module docstring), its plan, and the latent routed weights
    {layer: {"gate_up_proj", "down_proj"}} (the model's routed experts hold their ternary values)."""
    import moekit.hf as mh

    check_settings(experts, k, init, group_size)
    if not target_of(model.config).shared:
        raise ConfigError(f"model: {model.config.model_type} converts to a family without a shared expert; MoTE "
                          "keeps the FFN as one; expected a dense DeepSeek-V3 or Qwen2")
    layers = list(range(model.config.num_hidden_layers)) if layers is None else sorted(set(layers))
    g = torch.Generator().manual_seed(seed)
    routers = {i: torch.randn(experts, model.config.hidden_size, generator=g) * init_std for i in layers}
    copies = {}
    for i in layers:
        gate_up, down = upcycled_tensors(ffn(model, i), experts, routed_scale(model.config, 1))
        copies[i] = (gate_up, down.zero_() if init == "zero" else down)
    every = torch.arange(model.config.intermediate_size)
    moe = convert(model, copies, routers, k, max_logit=None,
                  shared={i: shared_tensors(ffn(model, i), every, shared_scale(model.config)) for i in layers})
    latent = {}
    for block in mh.view(moe):
        latent[block.layer] = {}
        for name in _NAMES:
            weight = getattr(block.experts.module, name)
            latent[block.layer][name] = weight.detach().clone()
            weight.copy_(ternary(weight, block.experts.transposed, group_size))
    plan = {"format": "moekit-make-plan", "version": 1, "source_type": model.config.model_type,
            "target_type": moe.config.model_type, "experts": experts, "k": k, "shared": 1, "partition": "mote",
            "router": "random", "seed": seed, "mote_init": init, "group_size": group_size,
            "layers": {str(i): "ternary copies" for i in layers}}
    return moe, plan, latent


def write_mote(out: Path, latent: dict[int, dict[str, Tensor]], group_size: int, init: str) -> None:
    """mote.json and mote_latent.safetensors into the checkpoint directory `out` (being written)."""
    from safetensors.torch import save_file

    save_file({f"layers.{i}.{name}": t.contiguous() for i, ws in latent.items() for name, t in ws.items()},
              str(out / LATENT))
    (out / MANIFEST).write_text(json.dumps({"format": "moekit-mote", "version": 1, "group_size": group_size,
                                            "init": init, "layers": sorted(latent)}))


def read_mote(directory: str | Path) -> dict | None:
    """The MoTE manifest of a checkpoint directory, None if it has none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        group_size, layers = int(manifest["group_size"]), [int(i) for i in manifest["layers"]]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: expected JSON with 'group_size' and 'layers' (written by make --method mote)"
                          ) from None
    return manifest | {"group_size": group_size, "layers": layers}


@contextlib.contextmanager
def ternary_training(model: nn.Module, directory: str | Path) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Inside the block `model` (loaded from the MoTE checkpoint `directory`) trains as MoTE does: the routed
    experts' forward uses the ternary values of latent weights (from mote_latent.safetensors) that receive the
    straight-through gradient; every parameter but the routers' and the routed experts' is frozen. On exit the
    routed experts hold the ternary values again and the yielded dict {layer: {name: latent}} the trained latents
    (for `write_mote`)."""
    from safetensors.torch import load_file
    from torch.nn.utils import parametrize

    import moekit.hf as mh

    manifest = read_mote(directory)
    stored = load_file(str(Path(directory) / LATENT))
    blocks = {b.layer: b for b in mh.view(model)}
    if sorted(blocks) != manifest["layers"]:
        raise ConfigError(f"{directory}: {MANIFEST} lists layers {manifest['layers']}; expected the model's MoE "
                          f"layers {sorted(blocks)}")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    latent: dict[int, dict[str, Tensor]] = {}
    for i, block in blocks.items():
        module = block.experts.module
        for p in block.router.parameters():
            p.requires_grad_(True)
        for name in _NAMES:
            key = f"layers.{i}.{name}"
            if key not in stored or stored[key].shape != getattr(module, name).shape:
                raise ConfigError(f"{directory}/{LATENT}: {key} missing or of another shape; expected "
                                  f"{list(getattr(module, name).shape)}")
            parametrize.register_parametrization(
                module, name, _StraightThrough(block.experts.transposed, manifest["group_size"]), unsafe=True)
            original = module.parametrizations[name].original
            with torch.no_grad():
                original.copy_(stored[key].to(original.dtype))
            original.requires_grad_(True)
    try:
        yield latent
    finally:
        for i, block in blocks.items():
            module = block.experts.module
            for name in _NAMES:
                latent.setdefault(i, {})[name] = module.parametrizations[name].original.detach().clone()
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for p in frozen:
            p.requires_grad_(True)


def mote_checkpoint(model_path: str, out: str, experts: int, k: int = 1, init: str = "copy", group_size: int = 64,
                    layers: list[int] | None = None, seed: int = 0, force: bool = False) -> dict:
    """`moekit make DENSE --method mote`: the MoTE model of the dense checkpoint written to `out` (model, tokenizer,
    plan.json, mote.json, mote_latent.safetensors). Returns the plan's summary."""
    from moekit.compress.run import check_out
    from moekit.files import temp_dir
    from moekit.hf import save
    from moekit.make import check
    from moekit.make.run import dense_config, finish_make, load_dense

    check_settings(experts, k, init, group_size)
    source = Path(model_path)
    check(dense_config(source), experts, k, layers, copies=True, shared=1)
    out_dir = check_out(out, source, [], force)
    moe, plan, latent = mote_upcycle(load_dense(source), experts, k, init, group_size, layers, seed)
    with temp_dir(out_dir, "make") as tmp:
        save(moe, tmp, force=True)
        write_mote(tmp, latent, group_size, init)
        return finish_make(source, tmp, out_dir, plan)
