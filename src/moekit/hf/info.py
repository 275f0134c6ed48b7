"""`describe(path)`: what an MoE checkpoint holds, from config.json and the safetensors headers only (no weight is
read into memory): family, which layers are MoE, experts per layer, k, shared experts, routing, parameter counts
(total and active per token) and bytes per expert and per layer.

Checkpoints on disk keep the family's original tensor names (transformers v5 converts them on load), so experts are
found by the family's `checkpoint_experts` pattern: per-expert tensors `...layers.{i}.<block>.experts.{j}.<proj>`
or fused ones (`...experts.gate_up_proj`, GraniteMoE's `input_linear` / `output_linear`) with E as their first
dimension. Shared experts (`shared_expert`, `shared_experts`) never match `.experts.`.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from typing import Any

from moekit.hf.families import Family
from moekit.hf.headers import CheckpointError, TensorInfo, weight_files
from moekit.hf.manifest import MANIFEST
from moekit.hf.validate import CONFIG, check_checkpoint

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SCALES = ("_scales", "_scale_inv", "_scale")


def _params(t: TensorInfo, quantized: bool) -> int:
    """Model parameters a stored tensor holds. In a quantized checkpoint (config.quantization_config), scale
    tensors (`*_scales`, `*_scale_inv`: MXFP4, FP8 blocks) hold none and MXFP4's uint8 `*_blocks` pack two 4-bit
    values per byte; everything else holds one per element."""
    if not quantized:
        return t.numel
    if t.name.endswith(_SCALES):
        return 0
    if t.name.endswith("_blocks") and t.dtype == "U8":
        return 2 * t.numel
    return t.numel


def _experts_in_layer(tensors: list[TensorInfo], pattern: re.Pattern, quantized: bool) -> tuple[int, int, int]:
    """(E, expert parameters, expert bytes) of one layer's tensors; E = 0 for a dense layer."""
    ids, fused_e, numel, nbytes = set(), 0, 0, 0
    for t in tensors:
        match = pattern.search(t.name)
        if match is None:
            continue
        numel += _params(t, quantized)
        nbytes += t.nbytes
        if match.groups() and match.group(1) is not None:
            ids.add(int(match.group(1)))
        else:
            fused_e = max(fused_e, t.shape[0])
    return max(fused_e, len(ids)), numel, nbytes


def _params_per_expert(family: Family, hidden: int, width: int) -> int:
    return 3 * hidden * width + (2 * width + hidden if family.bias else 0)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint directory `path`. Raises a MoekitError naming the file for
    whatever `moekit.hf.load` would refuse (`moekit.hf.validate.check_checkpoint`: a missing directory or config, an
    unsupported or dense model, a missing, truncated or corrupt shard, tensors that disagree with the config)."""
    checked = check_checkpoint(path)  # what the loader refuses, info refuses too
    directory, config, family, tensors = checked.directory, checked.config, checked.family, checked.tensors
    by_layer: dict[int, list[TensorInfo]] = defaultdict(list)
    for t in tensors.values():
        match = _LAYER.search(t.name)
        if match:
            by_layer[int(match.group(1))].append(t)
    k = 2 if family.routing == "sparsemixer" else family.k(config)
    moe_by_config = set(family.moe_layers(config))
    quant = _quantization(config)
    moekit_layers = {int(i): spec for i, spec in (getattr(config, "moekit_layers", None) or {}).items()}
    quant_layers = {int(i): spec for i, spec in (getattr(config, "moekit_quant", None) or {}).items()}
    widths = {i: spec["intermediate_size"] for i, spec in moekit_layers.items()}
    # moekit.core.experts.ragged layers (experts of different widths, packed): widths per expert in moekit_layers
    ragged = {i: spec["widths"] for i, spec in moekit_layers.items() if "widths" in spec}
    # moekit.core.experts.lowrank layers: every projection stored as rank-r factors, r (2I + H) + r (H + I) per
    # expert (plus GPT-OSS's whole biases)
    ranks = {i: spec["rank"] for i, spec in moekit_layers.items() if "rank" in spec}
    # moekit-quantized experts (moekit.compress.quantize) hold codes and scales: count their logical parameters
    moekit_quant = {i: spec["formats"] for i, spec in quant_layers.items()}
    quant_widths = {i: spec["widths"] for i, spec in quant_layers.items()
                    if spec.get("widths") is not None}  # experts of different widths, each quantized at its own
    pattern = re.compile(family.checkpoint_experts)
    layers, inactive, stored_quant = [], 0, 0
    for i in range(config.num_hidden_layers):
        experts, expert_params, expert_bytes = _experts_in_layer(by_layer.get(i, []), pattern, quant is not None)
        width = widths.get(i, family.width(config))
        per_expert = _params_per_expert(family, config.hidden_size, width)
        if i in ranks:
            per_expert = ranks[i] * (3 * width + 2 * config.hidden_size) + (2 * width + config.hidden_size
                                                                              if family.bias else 0)
        if i in moekit_quant:
            stored_quant += expert_params
            experts = len(moekit_quant[i])
            expert_params = experts * per_expert
            if i in quant_widths:
                expert_params = sum(_params_per_expert(family, config.hidden_size, w) for w in quant_widths[i])
            stored_quant -= expert_params
        if i in ragged:
            experts, per_expert = len(ragged[i]), 0
            if expert_params != sum(_params_per_expert(family, config.hidden_size, w) for w in ragged[i]):
                raise CheckpointError(f"{directory / CONFIG}: layer {i} experts hold {expert_params} parameters in the "
                                      f"weights; moekit_layers widths {ragged[i]} expect another count")
        if (experts > 0) != (i in moe_by_config):
            raise CheckpointError(f"{directory / CONFIG}: layer {i} is {'MoE' if i in moe_by_config else 'dense'} "
                                  f"by the config ({family.dense_rule}) but the weights say "
                                  f"{'MoE' if experts else 'dense'}")
        if experts and i not in ragged and i not in quant_widths and expert_params != experts * per_expert:
            raise CheckpointError(
                f"{directory / CONFIG}: layer {i} experts hold {expert_params // experts} parameters each in the "
                f"weights; hidden_size={config.hidden_size}, width {width} ({family.width_key} or moekit_layers) "
                f"expect {per_expert}")
        layer_bytes = sum(t.nbytes for t in by_layer.get(i, []))
        record = {"layer": i, "kind": "moe" if experts else "dense", "bytes": layer_bytes}
        if experts:
            record.update(experts=experts, width=width, bytes_per_expert=expert_bytes // experts)
            inactive += expert_params * (experts - min(k, experts)) // experts
        layers.append(record)
    total = sum(_params(t, quant is not None) for t in tensors.values()) - stored_quant
    if moekit_quant and quant is None:
        formats = Counter(f for fs in moekit_quant.values() for f in fs)
        quant = "moekit " + ", ".join(f"{f} x{n}" for f, n in sorted(formats.items()))
    dtype_bytes = Counter()
    for t in tensors.values():
        dtype_bytes[t.dtype] += t.nbytes
    shared_width = family.shared_width(config)
    return {
        "path": str(directory),
        "family": family.name,
        "model_type": family.model_type,
        "num_layers": config.num_hidden_layers,
        "moe_layers": [r["layer"] for r in layers if r["kind"] == "moe"],
        "dense_layers": [r["layer"] for r in layers if r["kind"] == "dense"],
        "experts_per_layer": {str(r["layer"]): r["experts"] for r in layers if r["kind"] == "moe"},
        "k": k,
        "hidden_size": config.hidden_size,
        "expert_width": family.width(config),
        "shared_experts": {"width": shared_width, "gate": family.shared_gate is not None} if shared_width else None,
        "routing": family.routing,
        "routing_options": family.routing_options(config),
        "total_params": total,
        "active_params": total - inactive,
        "total_bytes": sum(dtype_bytes.values()),
        "dtype": dtype_bytes.most_common(1)[0][0] if dtype_bytes else None,
        "dtypes": dict(dtype_bytes),
        "files": [p.name for p in weight_files(directory)],
        "layout": "moekit-manifest" if (directory / MANIFEST).exists() else "native",
        "quantization": quant,
        "layers": layers,
    }


def _quantization(config: Any) -> str | None:
    """config.quantization_config's quant_method (a dict or an object, depending on how it was read), or None."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def format_info(info: dict[str, Any]) -> str:
    """A short human-readable summary of `describe`'s result."""
    shared = info["shared_experts"]
    shared_text = "none" if shared is None else f"width {shared['width']}" + (" gated" if shared["gate"] else "")
    lines = [
        f"{info['path']}: {info['family']} ({info['model_type']}), {info['layout']}, {info['dtype']}"
        f"{', quantized ' + info['quantization'] if info['quantization'] else ''}, "
        f"{len(info['files'])} file(s)",
        f"layers: {info['num_layers']} (MoE: {_ranges(info['moe_layers'])}; dense: {_ranges(info['dense_layers'])})",
        f"experts per layer: {_compact(info['experts_per_layer'])}, k={info['k']}, config width "
        f"{info['expert_width']}, "
        f"shared: {shared_text}",
        f"routing: {info['routing']} {info['routing_options'] or ''}".rstrip(),
        f"params: {info['total_params']:,} total, {info['active_params']:,} active per token; "
        f"{info['total_bytes'] / 2**20:.2f} MiB",
        "layer  kind   experts  width  bytes/expert  bytes",
    ]
    for r in info["layers"]:
        lines.append(f"{r['layer']:<6} {r['kind']:<6} {r.get('experts', '-')!s:<8} {r.get('width', '-')!s:<6} "
                     f"{r.get('bytes_per_expert', '-')!s:<13} {r['bytes']}")
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "none"


def _compact(experts: dict[str, int]) -> str:
    values = set(experts.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{k}:{v}" for k, v in experts.items())
