"""Perplexity of a causal LM on labelled documents, by sliding window, overall and per domain.

Each document is scored on its own (tokens, then EOS where the tokenizer has one): windows of `seq_len` tokens
advance by `stride` (< seq_len); each token is predicted once, by the window that first covers it, with up to
seq_len - stride tokens of context before it (the first window predicts all but its first token). A document's
first token has no context and is not scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moekit.data import DataError, TextDoc, context_length, default_documents, encode, read_documents


def _doc_nll(model: nn.Module, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """(summed NLL in nats, tokens predicted) of one document."""
    total, count, scored = 0.0, 0, 1  # scored: tokens [0, scored) already predicted (the first never is)
    for start in range(0, max(len(ids) - 1, 1), stride):
        end = min(start + seq_len, len(ids))
        window = torch.tensor(ids[start:end]).unsqueeze(0)
        if window.shape[1] < 2 or end <= scored:
            break
        logits = model(input_ids=window).logits[0, :-1].float()  # predicts positions start+1 .. end-1
        targets = window[0, 1:]
        first = scored - (start + 1)  # skip the positions an earlier window predicted
        total += float(F.cross_entropy(logits[first:], targets[first:], reduction="sum"))
        count += len(targets) - first
        scored = end
        if end == len(ids):
            break
    return total, count


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, docs: Sequence[TextDoc], seq_len: int | None = None,
               stride: int | None = None, max_tokens: int | None = None, progress: bool = True) -> dict:
    """{"ppl", "nll", "tokens", "seq_len", "stride", "documents", "domains": {domain: {"ppl", "nll", "tokens"}}}
    over `docs` (domains only when some document has a label). `max_tokens` caps the predicted tokens, shared
    equally among the domains so a cap never leaves one out; documents are cut at their domain's cap. seq_len
    defaults to min(512, the model's context); stride to seq_len // 2."""
    context = context_length(model)
    seq_len = min(512, context) if seq_len is None else seq_len
    stride = max(1, seq_len // 2) if stride is None else stride
    if seq_len > context:
        raise DataError(f"seq_len={seq_len}: expected at most the model's context of {context} tokens")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens}: expected a positive number of tokens")
    if not 1 <= stride < seq_len:
        raise DataError(f"seq_len={seq_len}, stride={stride}: expected 1 <= stride < seq_len (a window's first token "
                        f"is context only, so windows must overlap by one)")
    domains = {doc.domain for doc in docs}
    cap = None if max_tokens is None else max(1, max_tokens // len(domains))
    sums: dict[str | None, list[float]] = {}
    for doc in tqdm(docs, desc="perplexity", unit="doc", disable=not progress, leave=False):
        entry = sums.setdefault(doc.domain, [0.0, 0])
        if cap is not None and entry[1] >= cap:
            continue
        ids = encode(tokenizer, doc.text)
        if cap is not None:
            ids = ids[: cap - entry[1] + 1]
        if len(ids) < 2:
            continue
        nll, count = _doc_nll(model, ids, seq_len, stride)
        entry[0] += nll
        entry[1] += count
    used = sum(int(v[1]) for v in sums.values())
    if used == 0:
        raise DataError("evaluation data: no document of two or more tokens; expected some text to score")
    nll = sum(v[0] for v in sums.values())
    out = {"ppl": math.exp(nll / used), "nll": nll / used, "tokens": used, "seq_len": seq_len, "stride": stride,
           "documents": len(docs)}
    if any(domain is not None for domain in sums):
        out["domains"] = {str(d): {"ppl": math.exp(v[0] / v[1]), "nll": v[0] / v[1], "tokens": int(v[1])}
                          for d, v in sorted(sums.items(), key=lambda kv: str(kv[0])) if v[1]}
    return out


def load_model_and_tokenizer(model_path: str | os.PathLike | None) -> tuple[Path, nn.Module, object | None, bool]:
    """(directory, model in float32, tokenizer or None when the checkpoint has none, is it moekit-tiny)."""
    from moekit.default import default_model_path
    from moekit.hf.checkpoint import load
    from moekit.hf.headers import CheckpointError
    from moekit.hf.validate import TOKENIZER_VOCAB

    path = Path(model_path) if model_path is not None else default_model_path()
    model = load(path, dtype=torch.float32)
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_VOCAB):  # tokenizer_config.json alone holds no vocabulary
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 (json, sentencepiece and transformers errors share no base class)
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise CheckpointError(f"{path}: the tokenizer files cannot be read ({reason}); expected a transformers "
                                  f"tokenizer (tokenizer.json)") from None
    return path, model, tokenizer, path.resolve() == default_model_path().resolve()


def model_and_documents(model_path: str | os.PathLike | None, data: list[str] | None
                        ) -> tuple[Path, nn.Module, object, list[TextDoc]]:
    """A checkpoint (None: moekit-tiny), its tokenizer and the documents of `data` (None: moekit-tiny's held-out
    split, for moekit-tiny only). The data files are read first: a bad one is refused before a model loads."""
    docs = read_documents(data) if data else None
    path, model, tokenizer, is_default = load_model_and_tokenizer(model_path)
    if tokenizer is None:
        raise DataError(f"{path}: no tokenizer files; expected tokenizer.json next to the weights")
    if not data and not is_default:
        raise DataError("--data: expected a data file (only moekit-tiny has a default held-out split)")
    return path, model, tokenizer, docs if docs is not None else default_documents()


def evaluate_checkpoint(model_path: str | None, data: list[str] | None, seq_len: int | None = None,
                        stride: int | None = None, max_tokens: int | None = None, skip: bool = True) -> dict:
    """`moekit eval`: perplexity of a checkpoint (None: moekit-tiny) on `data` files (None: moekit-tiny's
    held-out split, for moekit-tiny only). A skip.json beside the checkpoint (`moekit compress --skip`) is
    applied unless `skip` is False; the result then has `skip` {thresholds, renormalize, experts_per_token}."""
    from moekit.compress.skip import read_skip
    from moekit.hf.view import view

    path, model, tokenizer, docs = model_and_documents(model_path, data)
    spec = read_skip(path, len(view(model))) if skip else None
    result = (perplexity(model, tokenizer, docs, seq_len, stride, max_tokens) if spec is None
              else skipped_perplexity(model, tokenizer, docs, spec, seq_len=seq_len, stride=stride,
                                      max_tokens=max_tokens))
    return {"model": str(path), "data": data or "moekit-tiny held-out split", **result}


def skipped_perplexity(model: nn.Module, tokenizer, docs: Sequence[TextDoc], skip: dict, **kwargs) -> dict:
    """`perplexity` (same keyword arguments) with dynamic skipping applied to `model` in place: skip is
    {thresholds, renormalize} as skip.json holds it; the result gains `skip` with the experts per token each MoE
    layer used."""
    from moekit.compress.skip import apply_skip
    from moekit.hf.reroute import experts_per_token

    apply_skip(model, skip["thresholds"], skip["renormalize"])
    result = perplexity(model, tokenizer, docs, **kwargs)
    return {**result, "skip": {**skip, "experts_per_token": experts_per_token(model)}}
