"""`moekit bench compress`: every compression method at 25% and 50% expert reduction (HEAPr: that fraction of all
expert neurons), and the expert quantizations, as held-out perplexity against the original model and checkpoint
bytes. Quality, not speed: deterministic, so it can run while the machine is busy.

Data: moekit-tiny's held-out split (or `data` files) cut in two by document (`split_documents`): each domain's
even-numbered documents calibrate, its odd-numbered ones evaluate, so no method sees the text it is scored on.
Weights are rounded to the checkpoint's dtype before scoring (what a saved checkpoint holds). Frequency pruning is
the baseline every method is also compared with at the same ratio (`vs_frequency`: perplexity over frequency
pruning's).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn
from tqdm import tqdm

from moekit.compress import METHODS, apply, calibrate, plan, token_windows
from moekit.compress.calibrate import CalibrationWarning, Stats
from moekit.compress.run import checkpoint_dtype
from moekit.data import DataError, TextDoc, context_length
from moekit.eval import model_and_documents, perplexity
from moekit.hf.view import view

QUANTS = ("int8", "int4", "ternary")
COLUMNS = ["method", "ratio", "quant", "ppl", "ppl_ratio", "vs_frequency", "bytes", "bytes_ratio", "experts_per_layer"]


def stored_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's tensors stored once each, floating ones in `dtype` (integer codes as they are)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        size = torch.empty(0, dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def split_documents(docs: list[TextDoc]) -> tuple[list[TextDoc], list[TextDoc]]:
    """(calibration, evaluation): each domain's even-numbered documents calibrate, odd-numbered ones evaluate;
    both lists take the domains in turn, so a token cap still covers every domain."""
    by_domain: dict[str | None, list[TextDoc]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    halves = []
    for part in (0, 1):
        lists = [d[part::2] for d in by_domain.values()]
        halves.append([doc for group in itertools.zip_longest(*lists) for doc in group if doc is not None])
    return halves[0], halves[1]


def _window(model: nn.Module) -> tuple[int, int]:
    """(seq_len, stride): 256-token windows advancing by 224, shorter where the model's context is."""
    seq_len = min(256, context_length(model))
    return seq_len, seq_len - seq_len // 8


def _score(model: nn.Module, dtype: torch.dtype, tokenizer, docs, eval_tokens: int) -> dict:
    scored = copy.deepcopy(model).to(dtype).float()
    seq_len, stride = _window(model)
    return perplexity(scored, tokenizer, docs, seq_len=seq_len, stride=stride, max_tokens=eval_tokens, progress=False)


def _quant_rows(model: nn.Module, stats: Stats, score, dtype: torch.dtype) -> list[dict]:
    from moekit.compress.quantize import apply_quant, plan_quant

    rest = stored_bytes(model, dtype) - sum(
        sum(p.numel() for p in b.experts.module.parameters()) for b in view(model)) * dtype.itemsize
    int4 = plan_quant(model, None, "int4").expert_bytes
    rows = []
    for spec in (*QUANTS, f"mixed:{int4}"):
        qplan = plan_quant(model, stats, spec)  # mixed: routing-weighted output error on the calibration tokens
        quantized = apply_quant(copy.deepcopy(model), qplan)
        result = perplexity(quantized, *score, progress=False)
        rows.append({"method": spec.split(":")[0], "quant": spec, "ppl": result["ppl"], "domains": result.get(
            "domains"), "bytes": rest + qplan.expert_bytes, "bits_per_weight": round(qplan.bits_per_weight(), 3)})
    return rows


def bench_compress(model_path: str | None = None, data: list[str] | None = None, ratios=(0.25, 0.5),
                   cal_tokens: int = 2048, eval_tokens: int = 4096, quant: bool = True,
                   threads: int | None = 1) -> list[dict]:
    """One record per method and ratio (and quantization). `threads`: torch threads for the run (restored after;
    default 1: for a model of moekit-tiny's size a second thread gains little, and on a busy 2-core machine
    OpenMP's spin-waiting made the run 10x slower, 55 against 5 minutes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _bench(model_path, data, ratios, cal_tokens, eval_tokens, quant)
    finally:
        torch.set_num_threads(previous)


def _bench(model_path: str | None, data: list[str] | None, ratios, cal_tokens: int, eval_tokens: int,
           quant: bool) -> list[dict]:
    path, model, tokenizer, docs = model_and_documents(model_path, data)
    if len(docs) < 2:
        raise DataError("benchmark data: one document; expected at least two (half calibrate, half evaluate)")
    cal_docs, eval_docs = split_documents(docs)
    dtype = checkpoint_dtype(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = calibrate(model, token_windows(tokenizer, cal_docs, model, cal_tokens), grads=True)
    original = _score(model, dtype, tokenizer, eval_docs, eval_tokens)
    bytes_before = stored_bytes(model, dtype)
    rows = [{"method": "original", "ratio": 0.0, "ppl": original["ppl"], "domains": original.get("domains"),
             "bytes": bytes_before, "experts_per_layer": [b.num_experts for b in view(model)]}]
    jobs = [(r, m) for r in ratios for m in METHODS]
    for ratio, method in tqdm(jobs, desc="bench compress", unit="method", leave=False):
        compressed = apply(copy.deepcopy(model), plan(model, stats, method, ratio))
        result = _score(compressed, dtype, tokenizer, eval_docs, eval_tokens)
        rows.append({"method": method, "ratio": ratio, "ppl": result["ppl"], "domains": result.get("domains"),
                     "bytes": stored_bytes(compressed, dtype),
                     "experts_per_layer": [b.num_experts for b in view(compressed)]})
    if quant:
        rows += _quant_rows(model, stats, (tokenizer, eval_docs, *_window(model), eval_tokens), dtype)
    frequency = {r["ratio"]: r["ppl"] for r in rows if r["method"] == "frequency"}
    for r in rows:
        r["model"] = str(path)
        r["ppl_ratio"] = round(r["ppl"] / original["ppl"], 4)
        r["bytes_ratio"] = round(r["bytes"] / bytes_before, 4)
        if r.get("ratio") in frequency:
            r["vs_frequency"] = round(r["ppl"] / frequency[r["ratio"]], 4)
        if r.get("domains"):
            r["domain_ppl_ratio"] = {d: round(v["ppl"] / original["domains"][d]["ppl"], 4)
                                     for d, v in r.pop("domains").items()}
        else:
            r.pop("domains", None)
        r["ppl"] = round(r["ppl"], 4)
    rows[0].update(eval_tokens=original["tokens"], cal_tokens=stats.tokens)
    return rows
