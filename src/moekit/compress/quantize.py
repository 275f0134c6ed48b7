"""Quantization of a transformers MoE model's routed experts: `plan_quant(model, stats, spec) -> QuantPlan`, then
`apply_quant(model, plan)` swaps each MoE block's experts module for a `DispatchedQuantizedExperts` holding packed
codes (formats in `moekit.core.experts.qformat`), so the float expert weights are released and memory really drops.

spec: `int8`, `int4`, `ternary` (every expert in that format) or `mixed:<bytes>` (a format per expert chosen by an
integer program under a byte budget for all routed expert weights, `moekit.compress.mixed`; the budget takes an
optional unit: `mixed:3.5MB`, `mixed:2MiB`). Router, attention, embeddings and shared experts stay as they are.
Experts of different widths (`moekit.core.experts.ragged`, after HEAPr) are quantized and priced at their own widths.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from torch import nn

from moekit.compress.calibrate import Stats
from moekit.compress.mixed import expert_cost, plan_mixed
from moekit.compress.qexperts import expert_parts, expert_widths, quantize_experts, swap_experts
from moekit.core.experts.qformat import BITS, QuantizedExperts
from moekit.errors import ConfigError
from moekit.hf.view import view

UNIFORM = ("int8", "int4", "ternary")
DEFAULT_GROUP = 64
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SPEC_HELP = "expected int8, int4, ternary or mixed:<bytes> (e.g. mixed:3000000 or mixed:3MB)"


@dataclass
class QuantPlan:
    """spec: what was asked. group_size: inputs per scale. layers: {layer: format per expert}. budget: bytes allowed
    for the routed experts (mixed only). expert_bytes: bytes the routed experts will hold after `apply_quant`.
    weights: how many routed expert weights there are."""

    spec: str
    group_size: int
    layers: dict[int, list[str]]
    budget: int | None = None
    expert_bytes: int = 0
    weights: int = 0

    def bits_per_weight(self) -> float:
        """Average bits per routed expert weight, scales (and float biases) included."""
        return 8 * self.expert_bytes / self.weights if self.weights else 0.0

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = [{"layer": layer, "formats": f} for layer, f in sorted(self.layers.items())]
        d["bits_per_weight"] = round(self.bits_per_weight(), 4)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> QuantPlan:
        try:
            d = json.loads(text)
            layers = {int(e["layer"]): [str(f) for f in e["formats"]] for e in d["layers"]}
            plan = cls(str(d["spec"]), int(d["group_size"]), layers, d.get("budget"), int(d.get("expert_bytes", 0)),
                       int(d.get("weights", 0)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"{source}: expected a quantization plan as JSON with spec, group_size and layers "
                              f"[{{layer, formats}}]") from None
        bad = sorted({f for f in sum(layers.values(), []) if f not in BITS})
        if bad:
            raise ConfigError(f"{source}: format {bad[0]!r}; expected one of {', '.join(BITS)}")
        return plan


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`int8` -> ("int8", None); `mixed:3MB` -> ("mixed", 3000000). ConfigError otherwise."""
    if spec in UNIFORM:
        return spec, None
    m = re.fullmatch(r"mixed:([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", spec.strip()) if isinstance(spec, str) else None
    if m is None or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"quant {spec!r}: {_SPEC_HELP}")
    budget = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if budget <= 0:
        raise ConfigError(f"quant {spec!r}: expected a positive byte budget")
    return "mixed", budget


def _quantizable(model: nn.Module):
    blocks = view(model)
    for b in blocks:
        if isinstance(b.experts.module, QuantizedExperts):
            raise ConfigError(f"layer {b.layer}: experts are already quantized; expected a model with float experts")
        widths = expert_widths(b)
        if min(widths) < 1:
            raise ConfigError(f"layer {b.layer}: expert {widths.index(min(widths))} has no neurons left; expected "
                              "every expert to keep at least one to be quantized")
    return blocks


def plan_quant(model: nn.Module, stats: dict | Stats | None, spec: str, group_size: int = DEFAULT_GROUP
               ) -> QuantPlan:
    """The formats every routed expert of `model` gets under `spec`. For `mixed`, `stats` sets what the allocation
    minimises (see `moekit.compress.mixed.plan_mixed`): calibration `Stats`, the routing-weighted output error; a
    dict with per-layer `load`, load-weighted weight error; None, weight error. Ignored by the uniform formats."""
    kind, budget = parse_spec(spec)
    if not isinstance(group_size, int) or group_size < 4 or group_size % 4:
        raise ConfigError(f"group_size={group_size!r}: expected a positive multiple of 4")
    blocks = _quantizable(model)
    if kind == "mixed":
        layers = plan_mixed(blocks, stats, budget, group_size)
    else:
        layers = {b.layer: [kind] * b.num_experts for b in blocks}
    by_layer = {b.layer: b for b in blocks}
    expert_bytes = sum(expert_cost(by_layer[layer], e, f, group_size) for layer, fs in layers.items()
                       for e, f in enumerate(fs))
    weights = sum(sum(t.numel() for t in expert_parts(b, e)[:2]) for b in blocks for e in range(b.num_experts))
    return QuantPlan(spec, group_size, layers, budget, expert_bytes, weights)


def apply_quant(model: nn.Module, plan: QuantPlan, impl: str = "auto") -> nn.Module:
    """Quantize `model`'s routed experts as `plan` says, in place; returns `model`. `impl`: how the quantized experts
    run in moekit's dispatch (`auto`: the tuner's choice, `loop` or `threads`)."""
    blocks = _quantizable(model)
    layers = {b.layer for b in blocks}
    if set(plan.layers) != layers:
        raise ConfigError(f"plan.layers: covers layers {sorted(plan.layers)}; the model's MoE layers are "
                          f"{sorted(layers)}")
    for block in blocks:
        swap_experts(block, quantize_experts(block, plan.layers[block.layer], plan.group_size, impl))
    return model


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the storages `model`'s parameters and buffers hold (each storage once), split into the routed experts
    and the rest: {"experts", "rest", "total"}."""
    expert_storages = set()
    for b in view(model):
        module = b.experts.module
        for t in (*module.parameters(), *module.buffers()):
            expert_storages.add(t.untyped_storage().data_ptr())
    seen: set[int] = set()
    out = {"experts": 0, "rest": 0}
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        out["experts" if storage.data_ptr() in expert_storages else "rest"] += storage.nbytes()
    out["total"] = out["experts"] + out["rest"]
    return out

