"""`moekit bench compress --speed`: what compression costs or saves in forward time. The original model (as
`moekit.hf.load` gives it: transformers' own experts; and accelerated, through moekit's dispatch) and its
compressed variants (HEAPr at half the expert neurons: ragged experts; int8 and int4: dequantized per expert on
the fly; HEAPr then int4; these run their own loops, which `accelerate` leaves alone) run the same inputs,
interleaved round by round (`moekit.bench.timing.interleaved`), each timed as a prefill of `prefill` tokens and as
a one-token forward (no KV cache: the per-token cost of the layers). Medians, and ratios to the original measured
in the same rounds. All in float32, the dtype the CPU computes in.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from moekit.bench.timing import interleaved
from moekit.compress import apply, calibrate, plan, token_windows
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.eval import model_and_documents
from moekit.hf import accelerate

SPEED_COLUMNS = ["variant", "prefill_ms", "prefill_ratio", "token_ms", "token_ratio"]


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


@torch.no_grad()
def bench_compress_speed(model_path: str | None = None, data: list[str] | None = None, prefill: int = 256,
                         repeats: int = 7, cal_tokens: int = 2048) -> list[dict[str, Any]]:
    """One record per variant: median ms of a `prefill`-token forward and of a one-token forward, and their
    ratios to the original's (above 1: slower)."""
    _, model, tokenizer, docs = model_and_documents(model_path, data)
    model = model.float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, token_windows(tokenizer, docs, model, cal_tokens), grads=True, progress=False)
    variants = _variants(model, stats)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    long_ids = torch.randint(0, vocab, (1, prefill), generator=g)
    one_id = torch.randint(0, vocab, (1, 1), generator=g)
    prefill_ms = interleaved({n: (lambda m=m: m(input_ids=long_ids)) for n, m in variants.items()}, repeats)
    token_ms = interleaved({n: (lambda m=m: m(input_ids=one_id)) for n, m in variants.items()}, repeats * 5)
    return [{"variant": n, "prefill_tokens": prefill, "prefill_ms": round(prefill_ms[n], 3),
             "prefill_ratio": round(prefill_ms[n] / prefill_ms["original"], 3), "token_ms": round(token_ms[n], 3),
             "token_ratio": round(token_ms[n] / token_ms["original"], 3), "repeats": repeats}
            for n in variants]
