"""`moekit bench compress --speed`: what compression costs or saves in forward time. The original model (as
`moekit.hf.load` gives it: transformers' own experts; and accelerated, through moekit's dispatch) and its
compressed variants (HEAPr at half the expert neurons: ragged experts; int8 and int4: dequantized per expert on
the fly; HEAPr then int4; these run their own loops, which `accelerate` leaves alone) run the same inputs,
interleaved round by round (`moekit.bench.timing.interleaved`), each timed as a prefill of `prefill` tokens and as
a one-token forward (no KV cache: the per-token cost of the layers). Medians, and ratios to the original measured
in the same rounds. Once in float32 and once in bfloat16 (every variant built from the model in that dtype, its
quantized experts computing with activations of that dtype): the int8 / int4 experts run through torch's packed
weight-only kernels where they take the shape (`moekit.core.experts.qkernels`), else by dequantizing per call;
`packed_matrices` / `dequantized_matrices` count which ran. Every record carries the machine
(`timing.environment`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from moekit.bench.timing import environment, interleaved
from moekit.compress import apply, calibrate, plan, token_windows
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.eval import model_and_documents
from moekit.hf import accelerate

SPEED_COLUMNS = ["dtype", "variant", "prefill_ms", "prefill_ratio", "token_ms", "token_ratio", "packed_matrices"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _variants(model: nn.Module, stats) -> dict[str, nn.Module]:
    heapr = apply(copy.deepcopy(model), plan(model, stats, "heapr", 0.5))
    return {
        "original": model,
        "original, accelerated": accelerate(copy.deepcopy(model)),
        "heapr 50%": heapr,
        "int8": apply_quant(copy.deepcopy(model), plan_quant(model, None, "int8")),
        "int4": apply_quant(copy.deepcopy(model), plan_quant(model, None, "int4")),
        "heapr 50% + int4": apply_quant(copy.deepcopy(heapr), plan_quant(heapr, None, "int4")),
    }


def _kernel_counts(model: nn.Module) -> tuple[int, int]:
    """(matrices run through a packed kernel, matrices run by dequantizing) over the model's quantized experts."""
    kernels = [k for m in model.modules() for k in getattr(m, "_kernels", {}).values()]
    return sum(k is not None for k in kernels), sum(k is None for k in kernels)


@torch.no_grad()
def bench_compress_speed(model_path: str | None = None, data: list[str] | None = None, prefill: int = 256,
                         repeats: int = 7, cal_tokens: int = 2048,
                         dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[dict[str, Any]]:
    """One record per dtype and variant: median ms of a `prefill`-token forward and of a one-token forward, and
    their ratios to the original's in the same dtype (above 1: slower)."""
    _, model, tokenizer, docs = model_and_documents(model_path, data)
    model = model.float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, token_windows(tokenizer, docs, model, cal_tokens), grads=True, progress=False)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    long_ids = torch.randint(0, vocab, (1, prefill), generator=g)
    one_id = torch.randint(0, vocab, (1, 1), generator=g)
    env = environment()
    records = []
    for dtype in dtypes:
        base = model if DTYPES[dtype] == torch.float32 else copy.deepcopy(model).to(DTYPES[dtype])
        variants = _variants(base, stats)
        prefill_ms = interleaved({n: (lambda m=m: m(input_ids=long_ids)) for n, m in variants.items()}, repeats)
        token_ms = interleaved({n: (lambda m=m: m(input_ids=one_id)) for n, m in variants.items()}, repeats * 5)
        for n, m in variants.items():
            packed, dequantized = _kernel_counts(m)
            records.append({"variant": n, "dtype": dtype, "prefill_tokens": prefill,
                            "prefill_ms": round(prefill_ms[n], 3),
                            "prefill_ratio": round(prefill_ms[n] / prefill_ms["original"], 3),
                            "token_ms": round(token_ms[n], 3),
                            "token_ratio": round(token_ms[n] / token_ms["original"], 3),
                            "packed_matrices": packed, "dequantized_matrices": dequantized, "repeats": repeats,
                            **env})
    return records
