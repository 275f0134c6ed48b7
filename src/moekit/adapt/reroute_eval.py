"""Held-out perplexity with and without test-time rerouting, without leakage.

Each document is cut into chunks of `interval` tokens. Chunk [s, e) is scored from a window ending at e with up
to `seq_len` tokens; before it is scored the logit shifts are fitted on the tokens before s only (up to
`seq_len` of them), as generation refits on what it has produced so far. The shifts start at zero for each
document. The same windows are scored by the model's own routing, so the two perplexities differ only by the
shifts; the document's first token is never scored. Costs: wall seconds of each pass (the adapted one includes its
fits) and tokens per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moekit.adapt.reroute import LR, REG, reroute_online
from moekit.data import DataError, TextDoc, context_length, encode


def _chunk_nll(model: nn.Module, ids: list[int], s: int, e: int, seq_len: int) -> float:
    """Summed NLL of positions [s, e) from the window ids[max(0, e - seq_len) : e]."""
    c0 = max(0, e - seq_len)
    window = torch.tensor(ids[c0:e]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=window).logits[0, :-1].float()  # predicts c0+1 .. e-1
    first = s - (c0 + 1)
    return float(F.cross_entropy(logits[first:], window[0, 1:][first:], reduction="sum"))


def adapted_perplexity(model: nn.Module, tokenizer, docs: Sequence[TextDoc], interval: int = 128,
                       seq_len: int | None = None, max_tokens: int | None = None, layers: list[int] | None = None,
                       steps: int = 5, lr: float = LR, reg: float = REG, progress: bool = True) -> dict:
    """{"ppl", "ppl_adapted", "ppl_ratio", "tokens", "seconds", "seconds_adapted", "tokens_per_s",
    "tokens_per_s_adapted", "fits", settings}. The model is left as it was."""
    context = context_length(model)
    seq_len = min(512, context) if seq_len is None else seq_len
    if seq_len > context:
        raise DataError(f"seq_len={seq_len}: expected at most the model's context of {context} tokens")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens}: expected a positive number of tokens")
    rerouting = reroute_online(model, layers=layers, interval=interval, steps=steps, lr=lr, reg=reg)
    if interval >= seq_len:
        rerouting.restore()
        raise DataError(f"interval={interval}, seq_len={seq_len}: expected interval < seq_len (a chunk is scored "
                        "with context before it)")
    base = adapted = 0.0
    t_base = t_adapted = 0.0
    tokens = 0
    cap = None if max_tokens is None else max(1, max_tokens // len({d.domain for d in docs}))
    used: dict = {}  # domain -> tokens scored (max_tokens is shared equally among domains, as in perplexity)
    try:
        for doc in tqdm(docs, desc="rerouting", unit="doc", disable=not progress, leave=False):
            if cap is not None and used.get(doc.domain, 0) >= cap:
                continue
            ids = encode(tokenizer, doc.text)
            if cap is not None:
                ids = ids[: cap - used.get(doc.domain, 0) + 1]
            used[doc.domain] = used.get(doc.domain, 0) + max(len(ids) - 1, 0)
            rerouting.reset()
            for s in range(1, len(ids), interval):
                e = min(s + interval, len(ids))
                start = time.perf_counter()
                with rerouting.disabled():
                    base += _chunk_nll(model, ids, s, e, seq_len)
                t_base += time.perf_counter() - start
                start = time.perf_counter()
                if s >= 2:
                    rerouting.fit(torch.tensor(ids[max(0, s - seq_len):s]).unsqueeze(0))
                adapted += _chunk_nll(model, ids, s, e, seq_len)
                t_adapted += time.perf_counter() - start
                tokens += e - s
    finally:
        rerouting.restore()
    if tokens == 0:
        raise DataError("evaluation data: no document of two or more tokens; expected some text to score")
    return {"ppl": math.exp(base / tokens), "ppl_adapted": math.exp(adapted / tokens),
            "ppl_ratio": math.exp((adapted - base) / tokens), "tokens": tokens, "seconds": t_base,
            "seconds_adapted": t_adapted, "tokens_per_s": tokens / t_base, "tokens_per_s_adapted": tokens / t_adapted,
            "fits": rerouting.fits, "interval": interval, "seq_len": seq_len, "steps": steps, "lr": lr, "reg": reg,
            "layers": [b.layer for b in rerouting.blocks]}
