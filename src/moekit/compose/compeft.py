"""ComPEFT (Yadav et al.): compress a parameter-efficient update by keeping its top-k% magnitudes, storing only their
signs and one scale per tensor: τ̂ = s · sign(τ) ⊙ m, m the top-k mask. No retraining.

Scale (`scale=`): "lsq" (the default) is the least-squares scale given the mask and signs, the mean kept magnitude
(s = mean_{i∈m} |τ_i|), which needs no tuning; "std" is the paper's s = α·std(τ) (std over all entries of the
tensor), α chosen on validation data from a small grid by `tune_alpha`, which keeps the closed form unless an α does
strictly better on the validation loss. For any s >= 0, with k kept entries:
  ||τ - τ̂||_F² = ||τ||_F² - 2s·Σ_{i∈m}|τ_i| + k·s²     (exact; with the lsq scale this is ||τ||_F² - k·s², the
                                                        smallest over s: the lsq error never exceeds the std error)
  ||τ - τ̂||_∞  ≤ max(d, M - s, s - t)                  (d: largest dropped magnitude, t/M: smallest/largest kept)

Size: a tensor of n entries with k kept is stored as an n-bit mask, k sign bits and a 32-bit scale (the saved
format); `golomb_bits` is what Golomb-Rice coding of the kept positions would take instead (the paper's accounting).
The ratio is the original tensors' bits (at their stored dtype) over the compressed bits.

Applied to a LoRA adapter, τ is the task vector, fine-tuned minus initial: A - A_init for lora_A (A_init
regenerated from the adapter's lora_init.json, moekit.compose.adapters.init_lora_a) and B itself for lora_B (PEFT
starts B at 0); each is compressed with its own scale and A_init is added back on decompression, Â = A_init + τ̂_A.
An adapter without an init record (not written by `moekit lora train`) is refused with one line unless
`from_zero=True` (`--from-zero`), which compresses lora_A itself as if A_init were 0: its random initialisation then
dominates τ and the compression costs far more. The update's error is bounded by
||ΔW - ΔŴ||_F <= s·(||B||_2 ||A - Â||_F + ||B - B̂||_F ||Â||_2) with ||A - Â||_F = ||τ_A - τ̂_A||_F (`update_errors`).
`decompress_adapter` writes a plain PEFT adapter again (with the init record, so it compresses again).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.compose.adapters import (
    _KEY,
    CONFIG_NAME,
    INIT_NAME,
    PREFIX,
    AdapterError,
    LoraAdapter,
    check_output,
    lora_a_init,
    read_adapter,
    write_adapter,
)
from moekit.errors import UnknownNameError
from moekit.files import MAX_JSON_BYTES, read_bounded, swap_in, temp_dir

COMPRESSED_NAME = "compeft.safetensors"
META_NAME = "compeft.json"


@dataclass
class Ternary:
    """One compressed tensor: shape, mask [n] bool, signs [k] bool (True = negative) of the kept entries in order,
    scale s, the original dtype's bits per entry, and the bounds of the reconstruction error."""

    shape: tuple[int, ...]
    mask: Tensor
    signs: Tensor
    scale: float
    dtype_bits: int
    error_fro: float  # ||τ - τ̂||_F (exact, from the identity above)
    bound_inf: float  # the stated max-abs bound
    norm: float  # ||τ||_F

    @property
    def kept(self) -> int:
        return int(self.signs.numel())

    def bits(self) -> int:
        return self.mask.numel() + self.kept + 32

    def golomb_bits(self) -> int:
        return golomb_bits(self.mask) + self.kept + 32

    def original_bits(self) -> int:
        return self.mask.numel() * self.dtype_bits


def check_density(density: float, flag: str = "--density") -> None:
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise AdapterError(f"{flag}={density}: expected a fraction of entries to keep in (0, 1]")


SCALES = ("lsq", "std")
ALPHA_GRID = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)  # α·std; the paper tunes α on validation data


def check_scale(scale: str, alpha: float) -> None:
    if scale not in SCALES:
        raise UnknownNameError(f"--scale {scale}: unknown; expected one of {', '.join(SCALES)}")
    if not (isinstance(alpha, int | float) and alpha > 0 and math.isfinite(alpha)):
        raise AdapterError(f"--alpha {alpha}: expected a positive multiple of the tensor's std")


def compress_tensor(t: Tensor, density: float, scale: str = "lsq", alpha: float = 1.0) -> Ternary:
    """Top-`density` magnitudes of `t` as signs and one scale: least squares ("lsq") or alpha·std(t) ("std")."""
    check_density(density)
    check_scale(scale, alpha)
    flat = t.detach().reshape(-1).float()
    n = flat.numel()
    k = min(n, max(1, round(density * n)))
    mags = flat.abs()
    top = torch.topk(mags, k, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[top] = True
    kept = flat[mask]
    s = float(kept.abs().mean()) if scale == "lsq" else alpha * float(flat.double().std(correction=0))
    dropped = mags[~mask]
    d = float(dropped.max()) if dropped.numel() else 0.0
    t_min, t_max = float(kept.abs().min()), float(kept.abs().max())
    error_sq = float(flat.double().pow(2).sum()) - 2 * s * float(kept.double().abs().sum()) + k * s * s
    return Ternary(tuple(t.shape), mask, kept < 0, s, torch.finfo(t.dtype).bits if t.is_floating_point() else 32,
                   math.sqrt(max(error_sq, 0.0)), max(d, t_max - s, s - t_min),
                   float(flat.double().norm()))


def decompress_tensor(c: Ternary, dtype: torch.dtype = torch.float32) -> Tensor:
    flat = torch.zeros(c.mask.numel(), dtype=torch.float32)
    flat[c.mask] = torch.where(c.signs, -c.scale, c.scale)
    return flat.reshape(c.shape).to(dtype)


def golomb_bits(mask: Tensor) -> int:
    """Bits of the kept positions under Golomb-Rice coding of the gaps between them, with the best power-of-two
    parameter 2^b: each gap g costs (g >> b) + 1 + b bits; the parameter itself 5 bits."""
    pos = torch.nonzero(mask.reshape(-1)).reshape(-1).long()
    if pos.numel() == 0:
        return 5
    gaps = torch.diff(pos, prepend=torch.tensor([-1])) - 1
    return 5 + min(int((gaps >> b).sum()) + pos.numel() * (1 + b) for b in range(32))


@dataclass
class CompressedAdapter:
    """The compressed task vectors of an adapter; `init`: its LoRA init record (None: lora_A compressed itself)."""

    config: dict
    tensors: dict[str, Ternary]
    dtypes: dict[str, torch.dtype]
    init: dict | None = None

    def report(self) -> dict:
        original = sum(c.original_bits() for c in self.tensors.values())
        bits = sum(c.bits() for c in self.tensors.values())
        golomb = sum(c.golomb_bits() for c in self.tensors.values())
        kept = sum(c.kept for c in self.tensors.values())
        total = sum(c.mask.numel() for c in self.tensors.values())
        return {"entries": total, "kept": kept, "density": kept / total, "original_bits": original,
                "compressed_bits": bits, "compression_ratio": original / bits, "golomb_bits": golomb,
                "compression_ratio_golomb": original / golomb,
                "update": "A - A_init" if self.init is not None else "A (from zero)",
                "max_error_bound_inf": max(c.bound_inf for c in self.tensors.values()),
                "relative_error_fro": math.sqrt(sum(c.error_fro ** 2 for c in self.tensors.values())
                                                / max(sum(c.norm ** 2 for c in self.tensors.values()), 1e-30))}


def _a_init(key: str, shape: tuple[int, ...], init: dict | None) -> Tensor | None:
    """A_init of a lora_A key under the init record; None for lora_B keys or without a record."""
    m = _KEY.match(key)
    if init is None or m is None or m["part"] != "A":
        return None
    return lora_a_init(int(init["seed"]), m["module"].removeprefix(PREFIX), shape)


def compress_adapter(adapter: LoraAdapter, density: float, scale: str = "lsq", alpha: float = 1.0,
                     from_zero: bool = False) -> CompressedAdapter:
    """Every task vector of `adapter` (A - A_init, B) compressed to `density`, each with its own scale."""
    check_density(density)
    check_scale(scale, alpha)
    if adapter.init is None and not from_zero:
        raise AdapterError(f"{adapter.path}: no {INIT_NAME} (the seed lora_A was initialised from); expected an "
                           "adapter written by moekit lora train, whose update A - A_init ComPEFT compresses "
                           "(--from-zero compresses lora_A itself)")
    init = None if from_zero else adapter.init
    tensors = {}
    for k, t in adapter.tensors.items():
        a0 = _a_init(k, tuple(t.shape), init)
        c = compress_tensor(t if a0 is None else t.float() - a0, density, scale, alpha)
        bits = torch.finfo(t.dtype).bits if t.is_floating_point() else 32
        tensors[k] = replace(c, dtype_bits=bits)  # the size is counted at the adapter's stored dtype
    return CompressedAdapter(adapter.config, tensors, {k: t.dtype for k, t in adapter.tensors.items()}, init)


def tune_alpha(adapter: LoraAdapter, density: float, evaluate: Callable[[dict[str, Tensor]], float],
               grid: tuple[float, ...] = ALPHA_GRID, from_zero: bool = False, keep_closed_form: bool = True
               ) -> tuple[CompressedAdapter, dict]:
    """ComPEFT's α chosen on validation data: `evaluate(tensors)` is the validation loss (lower is better) of the
    adapter with the given (decompressed) tensors. The closed form ("lsq") is scored too and kept unless some α·std
    is strictly better (keep_closed_form=False: the best α·std whatever lsq scores, the paper's rule). Returns the
    chosen compression and {"scale", "alpha", "losses": {"lsq": x, "std:α": y}}."""
    check_density(density)
    if not grid:
        raise AdapterError("--alpha-grid: empty; expected at least one multiple of the std")
    best = compress_adapter(adapter, density, from_zero=from_zero)
    losses = {"lsq": float(evaluate(decompressed_tensors(best)))}
    chosen, best_loss = (("lsq", None), losses["lsq"] if keep_closed_form else math.inf)
    for alpha in grid:
        c = compress_adapter(adapter, density, "std", alpha, from_zero)
        loss = losses[f"std:{alpha:g}"] = float(evaluate(decompressed_tensors(c)))
        if loss < best_loss:
            best, best_loss, chosen = c, loss, ("std", alpha)
    return best, {"scale": chosen[0], "alpha": chosen[1], "losses": losses}


def validation_loss(model, config: dict, windows: Tensor, batch_size: int = 8) -> Callable[[dict[str, Tensor]], float]:
    """An `evaluate` for tune_alpha: mean next-token loss on windows [N, L] of `model` with a PEFT adapter of
    `config` holding the given tensors (the model is wrapped in place for each call, then unloaded)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from moekit.compose.loop import evaluate_ppl

    keep = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}

    def evaluate(tensors: dict[str, Tensor]) -> float:
        peft_model = get_peft_model(model, LoraConfig(**keep))
        try:
            set_peft_model_state_dict(peft_model, tensors)
            return math.log(evaluate_ppl(peft_model, windows, batch_size))
        finally:
            peft_model.unload()

    return evaluate


def decompressed_tensors(c: CompressedAdapter) -> dict[str, Tensor]:
    """The adapter's tensors again: τ̂ (+ A_init for lora_A when the init is recorded), in their stored dtypes."""
    out = {}
    for k, t in c.tensors.items():
        a0 = _a_init(k, t.shape, c.init)
        out[k] = (decompress_tensor(t) if a0 is None else decompress_tensor(t) + a0).to(c.dtypes[k])
    return out


def update_errors(adapter: LoraAdapter, c: CompressedAdapter) -> dict[str, tuple[float, float]]:
    """{module: (||ΔW - ΔŴ||_F, its bound)} where ΔW = s·B A: since BA - B̂Â = B(A - Â) + (B - B̂)Â,
    ||ΔW - ΔŴ||_F <= s·(||B||_2 ||A - Â||_F + ||B - B̂||_F ||Â||_2), the tensors' errors from the identity above."""
    keys = {}
    for key in c.tensors:
        m = _KEY.match(key)
        if m:
            keys.setdefault(m["module"], {})[m["part"]] = key
    out = {}
    restored = decompressed_tensors(c)
    for module, (a, b, scale) in adapter.modules().items():
        ka, kb = keys[module]["A"], keys[module]["B"]
        a_hat, b_hat = restored[ka].float(), restored[kb].float()
        error = scale * float(torch.linalg.matrix_norm(b.float() @ a.float() - b_hat @ a_hat))
        bound = scale * (float(torch.linalg.matrix_norm(b.float(), ord=2)) * c.tensors[ka].error_fro
                         + c.tensors[kb].error_fro * float(torch.linalg.matrix_norm(a_hat, ord=2)))
        out[module] = (error, bound)
    return out


def _pack(bits: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(bits.numpy().astype(np.uint8)))


def _unpack(packed: Tensor, n: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool))


def save_compressed(c: CompressedAdapter, out: str | os.PathLike, inputs: list = ()) -> Path:
    """A directory with the adapter's config, `compeft.safetensors` (packed mask and sign bits, scales) and
    `compeft.json` (shapes, dtypes, the size report)."""
    from safetensors.torch import save_file

    final = check_output(out, inputs, flag="--out", error=AdapterError)
    tensors, meta = {}, {"density_report": c.report(), "init": c.init, "tensors": {}}
    for key, t in c.tensors.items():
        tensors[f"{key}.mask"] = _pack(t.mask)
        tensors[f"{key}.signs"] = _pack(t.signs)
        tensors[f"{key}.scale"] = torch.tensor([t.scale], dtype=torch.float32)
        meta["tensors"][key] = {"shape": list(t.shape), "kept": t.kept, "dtype": str(c.dtypes[key]).split(".")[-1]}
    with temp_dir(final, "compeft") as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(c.config, indent=2, sort_keys=True) + "\n")
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        save_file(tensors, str(tmp / COMPRESSED_NAME))
        swap_in(tmp, final)
    return final


def load_compressed(path: str | os.PathLike) -> CompressedAdapter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / COMPRESSED_NAME).is_file():
        raise AdapterError(f"{p}: no {COMPRESSED_NAME}; expected a directory written by moekit lora compress")
    try:
        config = json.loads(read_bounded(p / CONFIG_NAME, MAX_JSON_BYTES, "adapter config", AdapterError))
        meta = json.loads(read_bounded(p / META_NAME, MAX_JSON_BYTES, "ComPEFT metadata", AdapterError))
        raw = load_file(p / COMPRESSED_NAME)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise AdapterError(f"{p}: cannot read ({e}); expected a directory written by moekit lora compress") from None
    tensors, dtypes = {}, {}
    for key, info in meta["tensors"].items():
        shape = tuple(info["shape"])
        n = math.prod(shape)
        mask = _unpack(raw[f"{key}.mask"], n)
        signs = _unpack(raw[f"{key}.signs"], int(info["kept"]))
        dtype = getattr(torch, info["dtype"])
        tensors[key] = Ternary(shape, mask, signs, float(raw[f"{key}.scale"][0]),
                               torch.finfo(dtype).bits, float("nan"), float("nan"), float("nan"))
        dtypes[key] = dtype
    return CompressedAdapter(config, tensors, dtypes, meta.get("init"))


def compress_adapter_dir(adapter: str | os.PathLike, out: str | os.PathLike, density: float, scale: str = "lsq",
                         alpha: float = 1.0, from_zero: bool = False) -> dict:
    """`moekit lora compress`: the size report of the written directory."""
    check_density(density)
    check_scale(scale, alpha)
    check_output(out, [adapter], flag="--out", error=AdapterError)
    c = compress_adapter(read_adapter(adapter), density, scale, alpha, from_zero)
    save_compressed(c, out, [adapter])
    return {"adapter": str(adapter), "out": str(out), "scale": scale, **({"alpha": alpha} if scale == "std" else {}),
            **c.report()}


def decompress_adapter(compressed: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A plain PEFT adapter from a compressed directory (loads with PeftModel.from_pretrained)."""
    check_output(out, [compressed], flag="--out", error=AdapterError)
    c = load_compressed(compressed)
    extra = {INIT_NAME: json.dumps(c.init) + "\n"} if c.init is not None else None
    return write_adapter(out, c.config, decompressed_tensors(c), [compressed], extra)


def tune_adapter_dir(adapter: str | os.PathLike, out: str | os.PathLike, density: float, model_path, data: list,
                     grid: tuple[float, ...] = ALPHA_GRID, seq_len: int = 64, max_tokens: int = 8192,
                     from_zero: bool = False) -> dict:
    """`moekit lora compress --scale auto`: α chosen on the validation documents `data` (full windows of seq_len
    tokens, at most max_tokens) with the closed form kept unless an α is strictly better; the size report plus the
    choice and each candidate's validation loss."""
    from moekit.compose.adapters import check_against_model, load_base
    from moekit.data import read_documents, windows

    check_density(density)
    check_output(out, [adapter, *data], flag="--out", error=AdapterError)
    lora = read_adapter(adapter)
    path, model, tokenizer = load_base(model_path)
    if tokenizer is None:
        raise AdapterError(f"--model {path}: no tokenizer.json; expected a checkpoint with its tokenizer")
    check_against_model(lora, model, str(path))
    full = [w.ids for w in windows(tokenizer, read_documents(data), seq_len, max_tokens) if w.ids.numel() == seq_len]
    if not full:
        raise AdapterError(f"--data: no window of {seq_len} tokens; expected validation text of at least {seq_len} "
                           f"tokens (or a smaller --seq-len)")
    c, info = tune_alpha(lora, density, validation_loss(model, lora.config, torch.stack(full)), grid, from_zero)
    save_compressed(c, out, [adapter, *data])
    return {"adapter": str(adapter), "out": str(out), **info, "validation_windows": len(full), **c.report()}
