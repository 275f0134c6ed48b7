"""`place_model`: what `moekit place` runs. Trace a model on text, place its experts on N devices, compare the
placement with contiguous placement in the simulator (optionally for every power of two from 2 to 64 devices) and
write placement.json atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit.serve.place import PlacementError, check_devices, counts_from_trace, place
from moekit.serve.simulate import CostModel, compare

SWEEP = (2, 4, 8, 16, 32, 64)


def check_out(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path:
    path = Path(out).resolve()
    for p in inputs:
        src = Path(p).resolve()
        if src == path or src in path.parents:
            raise PlacementError(f"--out {out}: is or lies inside the input {p}; expected a separate output file")
    if path.is_dir():
        raise PlacementError(f"--out {out}: is a directory; expected a file name such as placement.json")
    return path


def write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON at `path`, written atomically with the umask's mode (`moekit.files.atomic_write`)."""
    from moekit.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1))


def model_sizes(model) -> tuple[int, int]:
    """(hidden size, expert intermediate size) from the model's config."""
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    inter = int(getattr(cfg, "moe_intermediate_size", 0) or getattr(cfg, "intermediate_size", 0) or 0)
    return hidden, inter


def place_model(model_path: str | os.PathLike | None, data: Sequence[str | os.PathLike] | None, devices: int,
                out: str | os.PathLike, *, replicas: int = 0, max_tokens: int | None = 16384, sweep: bool = False,
                time_limit: float = 60.0, step_tokens: int = 2048, load_weight: float = 1.0,
                progress: bool = True) -> dict:
    """Trace, place, simulate, write `out` (placement.json); returns what was written."""
    from moekit.data import read_documents
    from moekit.default import default_model_path
    from moekit.eval import load_model_and_tokenizer
    from moekit.inspect.layers import find_layers
    from moekit.inspect.trace import trace

    if devices < 1:
        raise PlacementError(f"--devices {devices}: expected at least 1 device")
    if replicas < 0:
        raise PlacementError(f"--replicas {replicas}: expected 0 or more")
    if not 0 <= load_weight < float("inf"):
        raise PlacementError(f"--load-weight {load_weight}: expected a finite number, 0 or more")
    if not 0 < time_limit < float("inf"):
        raise PlacementError(f"--time-limit {time_limit}: expected a finite number of seconds above 0")
    if step_tokens < 1:
        raise PlacementError(f"--step-tokens {step_tokens}: expected at least 1")
    path = check_out(out, [*(data or ()), model_path or default_model_path()])
    docs = read_documents(data) if data else None
    checkpoint, model, tokenizer, _ = load_model_and_tokenizer(model_path)
    if tokenizer is None:
        raise PlacementError(f"{checkpoint}: no tokenizer files; expected tokenizer.json next to the weights")
    experts = {ly.num_experts for ly in find_layers(model)}
    check_devices(min(experts), devices)
    t = trace(model, docs, tokenizer, max_tokens=max_tokens, progress=progress)
    counts = counts_from_trace(t)
    check_devices(counts.num_experts, devices)
    hidden, inter = model_sizes(model)
    cost = CostModel(hidden, inter)
    idx = [t.indices(i).numpy() for i in range(len(t.layers))]
    masks = [None if t.mask(i) is None else t.mask(i).numpy() for i in range(len(t.layers))]
    placement, info = place(counts, devices, replicas=replicas, time_limit=time_limit, alpha=load_weight)
    result = {"model": t.model, "layers": t.layers, "num_experts": counts.num_experts, "tokens": counts.tokens,
              "replicas": replicas, "load_weight": load_weight, **placement.to_json(), "solver": info.to_json(),
              "simulation": compare(idx, counts, placement, cost, step_tokens=step_tokens, masks=masks)}
    if sweep:
        rows = []
        for n in (n for n in SWEEP if n <= counts.num_experts):
            p, inf = (placement, info) if n == devices else place(counts, n, replicas=replicas, time_limit=time_limit,
                                                                  alpha=load_weight)
            sim = compare(idx, counts, p, cost, step_tokens=step_tokens, masks=masks)
            rows.append({"devices": n, "solver": inf.to_json(), **{k: sim[k] for k in (
                "cross_reduction", "load_over_balanced", "follow_bytes_reduction", "speedup_split", "speedup_follow")}})
        result["sweep"] = rows
    write_json(path, _plain(result))
    return result


def _plain(obj):
    """numpy scalars and arrays as JSON values."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def summary_lines(result: dict) -> list[str]:
    s, sim = result["solver"], result["simulation"]
    a, b = sim["placed"], sim["contiguous"]
    lines = [f"{result['model']}: {result['num_experts']} experts x {len(result['layers'])} layers on "
             f"{result['devices']} devices ({result['tokens']:,} tokens traced, {result['replicas']} replicas per "
             f"layer, {result['slots']} slots per device)",
             f"solver: {s['method']} ({s['status']}), objective {s['objective']:.0f}, gap {s['gap']:.1%}, "
             f"{s['seconds']:.1f} s",
             f"cross-device tokens: {a['cross_tokens']:.0f} vs contiguous {b['cross_tokens']:.0f} "
             f"({sim['cross_reduction']:+.1%} fewer)",
             f"max device load (primary copies): {sim['load_over_balanced']:+.1%} over perfect balance, "
             f"{sim['load_over_lower_bound']:+.1%} over its bound max(balance, hottest expert) (contiguous "
             f"{b['max_device_load'] / b['balanced_load'] - 1:+.1%} / "
             f"{b['max_device_load'] / b['load_lower_bound'] - 1:+.1%})",
             f"simulated step: {sim['speedup_split']:.3f}x contiguous (data-parallel homes), "
             f"{sim['speedup_follow']:.3f}x (tokens follow experts; bytes {sim['follow_bytes_reduction']:+.1%} fewer)"]
    for row in result.get("sweep", []):
        lines.append(f"  {row['devices']:>2} devices: cross {row['cross_reduction']:+.1%}, load "
                     f"{row['load_over_balanced']:+.1%} over balance, step {row['speedup_split']:.3f}x / "
                     f"{row['speedup_follow']:.3f}x, {row['solver']['method']} gap {row['solver']['gap']:.1%}")
    return lines
