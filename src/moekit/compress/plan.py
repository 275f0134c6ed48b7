"""`Plan`: what a compression method decided, as plain data (JSON round trip through plan.json), before anything
is changed. `apply(model, plan)` carries it out.

layers maps a layer index to that layer's decision. Every method fills `keep` (the experts of the compressed
layer, in order, by their original index: for merging the dominant expert of each group); the rest is the
method's own: `groups` (merging: the original experts merged into each kept one), `weights` (their merge weights),
`perms` (M-SMoE: the neuron permutation aligning each member to its group's dominant expert), `router` (merged
router rows, [E', H] as lists), `neurons` (HEAPr: kept neuron indices per kept expert), `assign` (DERN: each
dropped expert's neuron -> [kept expert, neuron]).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError


class PlanError(MoekitError, ValueError):
    """A plan file is missing, malformed or does not fit the model."""


@dataclass
class Plan:
    method: str
    ratio: float
    layers: dict[int, dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def experts_per_layer(self) -> dict[int, int]:
        return {layer: len(d["keep"]) for layer, d in self.layers.items()}

    def to_json(self) -> str:
        data = asdict(self)
        data["layers"] = {str(k): v for k, v in self.layers.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "plan.json") -> Plan:
        try:
            data = json.loads(text)
            layers = {int(k): dict(v) for k, v in data["layers"].items()}
            if any(not isinstance(v.get("keep"), list) for v in layers.values()):
                raise KeyError("keep")
            return cls(str(data["method"]), float(data["ratio"]), layers, dict(data.get("options", {})),
                       dict(data.get("summary", {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise PlanError(f"{source}: not a compression plan; expected JSON with 'method', 'ratio' and 'layers' "
                            f"{{layer: {{'keep': [...], ...}}}}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"{p}: missing; expected a plan.json written by moekit compress")
        return cls.from_json(p.read_text(), str(p))
