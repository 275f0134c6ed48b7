"""Where each routed expert's bytes lie in a checkpoint: `checkpoint_layout` reads every safetensors header,
`expert_parts` names, per (layer, expert), the byte ranges of its matrices whatever the layout (per-expert
tensors, fused [E, ...] tensors, ragged packs, quantized codes and scales)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from moekit.runtime.store import (
    Part,
    PreadReader,
    StoreError,
    TensorLoc,
    columns_part,
    rows_part,
    safetensors_layout,
    slice_part,
    whole_part,
)

_LAYER = re.compile(r"layers\.(\d+)\.")
_PER_EXPERT = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_FUSED = {"gate_up_proj": "gate_up", "down_proj": "down", "input_linear": "gate_up", "output_linear": "down"}
_QUANT = re.compile(r"\.experts\.(gate_up_q|down_q)\.(\d+)\.(codes|scale)$")

def checkpoint_layout(directory: Path, reader: PreadReader) -> dict[str, TensorLoc]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise StoreError(f"{directory}: no .safetensors files; expected a checkpoint directory")
    out: dict[str, TensorLoc] = {}
    for f in files:
        out.update(safetensors_layout(f, reader))
    return out


def expert_parts(layout: dict[str, TensorLoc], blocks: dict[int, nn.Module], family
                 ) -> tuple[dict[tuple[int, int], dict[str, Part]], set[str]]:
    """Every routed expert's tensors as Parts, and the names of the tensors that are expert matrices."""
    pattern = re.compile(family.checkpoint_experts)
    parts: dict[tuple[int, int], dict[str, Part]] = {}
    taken: set[str] = set()
    for name, loc in layout.items():
        lm = _LAYER.search(name)
        if lm is None or int(lm.group(1)) not in blocks or name.endswith("bias") or "bias_packed" in name:
            continue
        layer, module = int(lm.group(1)), blocks[int(lm.group(1))]
        q = _QUANT.search(name)
        em = pattern.search(name)
        suffix = name.rsplit(".", 2)
        if q is not None:
            key, role = (layer, int(q.group(2))), f"{q.group(1)[:-2]}.{q.group(3)}"
            parts.setdefault(key, {})[role] = whole_part(loc)
        elif name.endswith("experts.gate_up_packed") or name.endswith("experts.down_packed"):
            for e, (o, w) in enumerate(zip(module.offsets, module.widths, strict=True)):
                part = rows_part(loc, 2 * o, 2 * o + 2 * w) if "gate_up" in name else columns_part(loc, o, o + w)
                parts.setdefault((layer, e), {})["gate_up" if "gate_up" in name else "down"] = part
        elif em is not None and em.re.groups and em.group(1) is not None:
            role = _PER_EXPERT.get(suffix[-2] if suffix[-1] == "weight" else suffix[-1])
            if role is None:
                continue
            parts.setdefault((layer, int(em.group(1))), {})[role] = whole_part(loc)
        elif em is not None:
            role = _FUSED.get(suffix[-2] if suffix[-1] == "weight" else suffix[-1])
            if role is None:
                continue
            for e in range(loc.shape[0]):
                parts.setdefault((layer, e), {})[role] = slice_part(loc, e)
        else:
            continue
        taken.add(name)
    for key, p in parts.items():  # per-expert gate and up rows -> one [2I, H] gate_up (gate rows first)
        if "gate" in p and "up" in p:
            gate, up = p.pop("gate"), p.pop("up")
            p["gate_up"] = Part(gate.dtype, (gate.shape[0] + up.shape[0], *gate.shape[1:]), gate.ranges + up.ranges)
        need = {"gate_up", "down"} if "gate_up.codes" not in p else {"gate_up.codes", "down.codes"}
        if not need <= set(p):
            raise StoreError(f"expert {key[1]} of layer {key[0]}: tensors {sorted(need - set(p))} missing from the "
                             "checkpoint")
    return parts, taken


def main_dtype(layout: dict[str, TensorLoc]) -> torch.dtype:
    sizes: dict[str, int] = {}
    for loc in layout.values():
        if loc.dtype in ("F32", "F16", "BF16"):
            sizes[loc.dtype] = sizes.get(loc.dtype, 0) + loc.nbytes
    if not sizes:
        raise StoreError("checkpoint: no float tensors; expected a model's weights")
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[max(sizes, key=sizes.get)]
