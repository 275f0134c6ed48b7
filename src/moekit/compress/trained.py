"""The compress methods that train on the calibration tokens instead of removing experts (no --ratio):
`mote` (`moekit.compress.mote_hf`) and `compressed-experts` (`moekit.compress.compressed_hf`), with their options
`--steps`, `--keep`, `--rank`. `check_options` refuses what does not fit before any work; `run_trained` does it."""

from __future__ import annotations

from torch import nn

from moekit.compress.calibrate import Stats
from moekit.errors import ConfigError

TRAINED = {
    "mote": "MoTE: train the routed experts ternary (absmean, straight-through) to reproduce each full-precision "
            "block, shared experts and router kept; stored in moekit's ternary format (--steps)",
    "compressed-experts": "Compressed Experts: each token's --keep heaviest experts run in full, the others as "
                          "fitted rank-R linear + GELU maps (--keep, --rank, --steps); full checkpoint + "
                          "compressed_experts.safetensors",
}
DEFAULT_STEPS = {"mote": 100, "compressed-experts": 200}


def check_options(method: str | None, keep: int | None, rank: int | None, steps: int | None) -> None:
    """--keep / --rank belong to compressed-experts, --steps to both trained methods."""
    given = {"--keep": keep, "--rank": rank, "--steps": steps}
    allowed = {"mote": ("--steps",), "compressed-experts": ("--keep", "--rank", "--steps")}.get(method or "", ())
    for flag, value in given.items():
        if value is None:
            continue
        if flag not in allowed:
            users = "compressed-experts" if flag != "--steps" else "mote and compressed-experts"
            raise ConfigError(f"{flag}: used by --method {users} only; got --method {method}")
        if not isinstance(value, int) or value < (0 if flag == "--steps" else 1):
            raise ConfigError(f"{flag} {value!r}: expected a {'non-negative' if flag == '--steps' else 'positive'} "
                              "integer")


def check_model(model: nn.Module, method: str, keep: int | None, rank: int | None) -> None:
    """Refuse, before calibrating, options the model cannot take (--keep from 1 to k - 1, --rank up to H)."""
    if method == "compressed-experts":
        from moekit.compress.compressed_experts import CompressedExpertsConfig
        from moekit.compress.compressed_hf import _check_block
        from moekit.hf.view import view

        for b in view(model):
            _check_block(b, 1 if keep is None else keep)
            cfg = CompressedExpertsConfig(keep=1 if keep is None else keep, rank=8 if rank is None else rank)
            if not cfg.rank <= b.experts.hidden_size:
                raise ConfigError(f"--rank {cfg.rank}: expected at most hidden_size = {b.experts.hidden_size}")
    elif method == "mote":
        from moekit.compress.mote_hf import _check_block
        from moekit.hf.view import view

        for b in view(model):
            _check_block(b)


def run_trained(model: nn.Module, stats: Stats, method: str, keep: int | None = None, rank: int | None = None,
                steps: int | None = None, progress: bool = True) -> dict:
    """Apply `method` to `model` in place; returns its summary (for report.json) with, for mote, the applied
    "quant_plan" (a QuantPlan, popped by the caller)."""
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if method == "mote":
        from moekit.compress.mote_hf import mote

        return mote(model, stats, steps=steps, progress=progress)
    if method == "compressed-experts":
        from moekit.compress.compressed_hf import compress_experts

        return compress_experts(model, stats, keep=1 if keep is None else keep, rank=8 if rank is None else rank,
                                steps=steps, progress=progress)
    raise ConfigError(f"--method {method}: expected one of {', '.join(TRAINED)}")
