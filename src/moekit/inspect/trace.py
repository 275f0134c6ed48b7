"""`trace(model, docs, tokenizer)`: run a model over documents and record, per MoE layer and token, where the router
sent the token (top-k indices and weights, optionally the full logits) with its token id, position and domain.

Tokens are stored flattened, N in all, in the order the model saw them. Besides what the router returned, each
layer keeps three cheap per-token summaries of the router's probability distribution p [E] (softmax of the
logits; normalised sigmoid for DeepSeek-V3), so statistics need no logits: its entropy, p at the chosen slots, and
how many experts it takes to cover 50% and 90% of p.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit.core.routing import Routing
from moekit.data import TextDoc, Window, context_length, default_documents, windows
from moekit.errors import ConfigError
from moekit.inspect.layers import InspectError, body, find_layers, routing_hooks
from moekit.inspect.store import DiskStore, MemoryStore

MASS_LEVELS = (0.5, 0.9)


class Trace:
    """A recorded routing trace (see `trace`). Per-token arrays are [N]; per-layer accessors take the traced-layer
    number i (0 .. len(layers) - 1), not the model's layer index (that is `layers[i]`)."""

    def __init__(self, store: MemoryStore | DiskStore, meta: dict):
        self._store = store
        self.meta = meta
        self.layers: list[int] = meta["layers"]
        self.num_experts: list[int] = meta["num_experts"]
        self.k: list[int] = meta["k"]
        self.domain_names: list[str] = meta["domain_names"]
        self.model: str = meta["model"]
        self.seq_len: int = meta["seq_len"]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Trace:
        """A trace that `trace(..., out_dir=directory)` wrote."""
        store, meta = DiskStore.open(directory)
        return cls(store, meta)

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def token_ids(self) -> Tensor:  # [N] int64
        return self._store.get("token_ids")

    @property
    def positions(self) -> Tensor:  # [N] int64, position in the model input (0 .. seq_len - 1)
        return self._store.get("positions")

    @property
    def doc(self) -> Tensor:  # [N] int64, index of the document in the docs traced
        return self._store.get("doc")

    @property
    def window(self) -> Tensor:  # [N] int64, which model input (one context window) the token was in
        return self._store.get("window")

    @property
    def domain_ids(self) -> Tensor:  # [N] int64 into domain_names, -1 where the document had no label
        return self._store.get("domain")

    @property
    def domains(self) -> list[str | None]:
        """[N] the domain label of each token (None where the document had none)."""
        names = self.domain_names
        return [names[d] if d >= 0 else None for d in self.domain_ids.tolist()]

    def indices(self, i: int) -> Tensor:  # [N, k] int64 expert ids
        return self._store.get(f"{i}.indices")

    def weights(self, i: int) -> Tensor:  # [N, k] float32 combine weights
        return self._store.get(f"{i}.weights")

    def mask(self, i: int) -> Tensor | None:  # [N, k] bool, False on padded slots; None: every slot real
        key = f"{i}.mask"
        return self._store.get(key) if self._store.has(key) else None

    def logits(self, i: int) -> Tensor:  # [N, E] float32
        key = f"{i}.logits"
        if not self._store.has(key):
            raise InspectError("logits: not recorded in this trace; expected trace(..., record_logits=True)")
        return self._store.get(key)

    @property
    def has_logits(self) -> bool:
        return self._store.has("0.logits")

    def probs_topk(self, i: int) -> Tensor:  # [N, k] router probability p at the chosen slots
        return self._store.get(f"{i}.probs_topk")

    def entropy(self, i: int) -> Tensor:  # [N] entropy of p in nats
        return self._store.get(f"{i}.entropy")

    def mass_experts(self, i: int) -> Tensor:  # [N, 2] experts needed to cover 50% and 90% of p
        return self._store.get(f"{i}.mass")

    def __repr__(self) -> str:
        return (f"Trace(model={self.model!r}, tokens={self.num_tokens}, layers={self.layers}, "
                f"domains={self.domain_names})")


def _layer_record(i: int, r: Routing, record_logits: bool) -> dict[str, Tensor]:
    probs = r.probs.float()  # [T, E]
    sorted_p = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    mass = torch.stack([(sorted_p < q - 1e-6).sum(dim=-1) + 1 for q in MASS_LEVELS], dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    out = {f"{i}.indices": r.indices.long().cpu(), f"{i}.weights": r.weights.float().cpu(),
           f"{i}.probs_topk": probs.gather(1, r.indices.long()).cpu(), f"{i}.entropy": entropy.cpu(),
           f"{i}.mass": mass.to(torch.int16).cpu()}
    if r.mask is not None:
        out[f"{i}.mask"] = r.mask.bool().cpu()
    if record_logits:
        out[f"{i}.logits"] = r.logits.float().cpu()
    return out


def select_windows(tokenizer, docs: Sequence[TextDoc], seq_len: int, max_tokens: int | None) -> list[Window]:
    """The context windows to trace. With `max_tokens`, the budget is shared equally among the domains (in order
    of first appearance), so a cap keeps every domain rather than only the first documents'."""
    if max_tokens is None:
        return windows(tokenizer, docs, seq_len)
    if max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}: expected a positive number of tokens")
    groups: dict[str | None, list[int]] = {}
    for j, d in enumerate(docs):
        groups.setdefault(d.domain, []).append(j)
    out: list[Window] = []
    share, extra = divmod(max_tokens, len(groups))
    for g, idx in enumerate(groups.values()):
        for w in windows(tokenizer, [docs[j] for j in idx], seq_len, share + (g < extra)):
            out.append(Window(w.ids, idx[w.doc], w.domain, w.start))
    return sorted(out, key=lambda w: (w.doc, w.start))


def batch_numbers(wins: list[Window], batch_size: int = 8) -> list[list[int]]:
    """Window numbers grouped into batches of equal length (no padding needed)."""
    by_len: dict[int, list[int]] = {}
    for n, w in enumerate(wins):
        by_len.setdefault(len(w.ids), []).append(n)
    return [ns[s:s + batch_size] for ns in by_len.values() for s in range(0, len(ns), batch_size)]


def resolve_data(model: nn.Module, docs: Sequence[TextDoc] | None, tokenizer) -> tuple[list[TextDoc], object]:
    """docs and tokenizer, defaulting to moekit-tiny's held-out documents and tokenizer."""
    from moekit.default import default_model_path, default_tokenizer

    if tokenizer is None:
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        if docs is not None and not (name and Path(name).resolve() == default_model_path().resolve()):
            raise ConfigError("tokenizer: required when docs are given for a model other than moekit-tiny")
        tokenizer = default_tokenizer()
    return (list(default_documents()) if docs is None else list(docs)), tokenizer


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")


def _check_args(model: nn.Module, docs: list, seq_len: int | None, max_tokens: int | None, batch_size: int) -> int:
    """The window length to trace with, after checking the arguments of `trace` by name."""
    if not docs:
        raise ConfigError("docs: empty; expected at least one document (or None for moekit-tiny's held-out text)")
    bad = next((d for d in docs if not isinstance(d, TextDoc)), None)
    if bad is not None:
        raise ConfigError(f"docs: holds a {type(bad).__name__}; expected moekit.data.TextDoc items (see "
                          "moekit.data.read_documents)")
    _positive("batch_size", batch_size)
    if max_tokens is not None:
        _positive("max_tokens", max_tokens)
    context = context_length(model)
    if seq_len is None:
        return context
    _positive("seq_len", seq_len)
    if seq_len > context:
        raise ConfigError(f"seq_len={seq_len}: expected at most the model's context of {context} tokens")
    return seq_len


def _check_vocab(model: nn.Module, wins: list[Window]) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max(int(w.ids.max()) for w in wins)
    if vocab is not None and top >= vocab:
        raise InspectError(f"tokenizer: produced token id {top}, the model's vocab_size is {vocab}; expected the "
                           "model's own tokenizer")


@torch.no_grad()
def trace(model: nn.Module, docs: Sequence[TextDoc] | None = None, tokenizer=None, *, seq_len: int | None = None,
          max_tokens: int | None = None, record_logits: bool = False, out_dir: str | os.PathLike | None = None,
          progress: bool = True, batch_size: int = 8) -> Trace:
    """Run `model` over `docs` (default: moekit-tiny's held-out documents) and record its routing.

    docs are cut into windows of `seq_len` tokens (default: the model's context); `max_tokens` caps the total,
    shared equally among domains. With `out_dir`, chunks stream to safetensors files there (bounded memory) and the
    returned Trace reads them back; otherwise it is held in memory. The model is run as it is (eval or train mode,
    accelerated or not); its weights are not changed.
    """
    layers = find_layers(model)
    docs, tokenizer = resolve_data(model, docs, tokenizer)
    seq_len = _check_args(model, docs, seq_len, max_tokens, batch_size)
    wins = select_windows(tokenizer, docs, seq_len, max_tokens)
    if not wins:
        raise InspectError("docs: no tokens to trace; expected at least one non-empty document")
    _check_vocab(model, wins)
    names = list(dict.fromkeys(d.domain for d in docs if d.domain is not None))
    domain_id = {n: j for j, n in enumerate(names)}
    device = next(model.parameters()).device
    store = DiskStore(out_dir) if out_dir is not None else MemoryStore()
    runner = body(model)
    seen: dict[int, Routing] = {}

    def record(i: int, routing: Routing) -> None:
        if i in seen:
            raise InspectError(f"layer {layers[i].layer}: its router ran twice in one forward; expected once")
        seen[i] = routing

    try:
        with routing_hooks(layers, record):
            for batch in tqdm(batch_numbers(wins, batch_size), desc="trace", unit="batch", disable=not progress):
                ids = torch.stack([wins[n].ids for n in batch])  # [B, L]
                seen.clear()
                runner(ids.to(device))
                if len(seen) != len(layers):
                    raise InspectError(f"{type(model).__name__}: {len(seen)} of {len(layers)} MoE layers ran; "
                                       "expected every MoE layer to route every token")
                B, L = ids.shape
                chunk = {"token_ids": ids.reshape(-1), "positions": torch.arange(L).repeat(B),
                         "doc": torch.tensor([wins[n].doc for n in batch]).repeat_interleave(L),
                         "window": torch.tensor(batch).repeat_interleave(L),
                         "domain": torch.tensor([domain_id.get(wins[n].domain, -1) for n in batch]
                                                ).repeat_interleave(L)}
                for i, r in seen.items():
                    if r.indices.shape[0] != B * L:
                        raise InspectError(f"layer {layers[i].layer}: routed {r.indices.shape[0]} tokens of {B * L}; "
                                           "expected every token of the input")
                    chunk.update(_layer_record(i, r, record_logits))
                store.add(chunk)
    except BaseException:
        if isinstance(store, DiskStore):
            store.abort()
        raise
    model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    meta = {"layers": [ly.layer for ly in layers], "num_experts": [ly.num_experts for ly in layers],
            "k": [ly.k for ly in layers], "domain_names": names, "model": model_name, "seq_len": seq_len,
            "num_tokens": sum(len(w.ids) for w in wins), "num_windows": len(wins)}
    return Trace(store.finish(meta), meta)
