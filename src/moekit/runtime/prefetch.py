"""Prefetch for offloaded experts: what to read before a layer's real gate has run.

- `next-layer`: speculation, layer l+1's router applied to layer l's hidden state (Mixtral-offloading, AdapMoE).
- `predictor`: ExpertFlow's routing-path predictor, a small network trained on `moekit.inspect.trace` routes that,
  from the token id and the previous token's routing path, scores every layer's experts before the token is
  computed (`PathPredictor`; saved as safetensors + json).
- `pregate`: Read-ME's lookahead, for models with a pre-gating router decoupled from the backbone: a callable
  `pregate(input_ids [B, T]) -> list (per MoE layer) of [B * T, k] expert ids`, known before any layer runs.

Predictions of layer l+1 are read while layer l computes; after the real gate of l+1, the store loads the misses
and demotes the mispredicted prefetches (evicted first). Prefill (more than one token per row) prefetches nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moekit.errors import ConfigError, UnknownNameError
from moekit.runtime.replay import Routes, token_routes

PREFETCH_MODES = ("none", "next-layer", "predictor", "pregate")
WEIGHTS, CONFIG = "moekit-predictor.safetensors", "moekit-predictor.json"


class PathPredictor(nn.Module):
    """logits [N, L, E] of every layer's experts from token ids [N] and the previous token's path [N, L, E]
    (multi-hot; zeros at a sequence's first token): out(relu(embed(id) + prev(path)))."""

    def __init__(self, vocab: int, num_layers: int, num_experts: int, dim: int = 64):
        super().__init__()
        self.vocab, self.num_layers, self.num_experts, self.dim = vocab, num_layers, num_experts, dim
        self.embed = nn.Embedding(vocab, dim)
        self.prev = nn.Linear(num_layers * num_experts, dim)
        self.out = nn.Linear(dim, num_layers * num_experts)

    def forward(self, ids: Tensor, prev: Tensor) -> Tensor:
        h = torch.relu(self.embed(ids.clamp(0, self.vocab - 1)) + self.prev(prev.flatten(1)))
        return self.out(h).view(-1, self.num_layers, self.num_experts)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes WEIGHTS and CONFIG into `directory` (each to a temporary name, then renamed)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "moekit-path-predictor", "version": 1, "vocab": self.vocab, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "dim": self.dim}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / f".{WEIGHTS}.tmp")
        (out / f".{CONFIG}.tmp").write_text(json.dumps(meta))
        os.replace(out / f".{WEIGHTS}.tmp", out / WEIGHTS)
        os.replace(out / f".{CONFIG}.tmp", out / CONFIG)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PathPredictor:
        d = Path(directory)
        try:
            meta = json.loads((d / CONFIG).read_text())
            model = cls(meta["vocab"], meta["num_layers"], meta["num_experts"], meta["dim"])
            model.load_state_dict(load_file(d / WEIGHTS))
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{d}: not a path predictor ({CONFIG} + {WEIGHTS}): {err}") from None
        return model.eval()


def _previous(paths: Tensor, request: Tensor) -> Tensor:
    """[N, L, E] the path of each token's predecessor in its request (zeros for the first)."""
    prev = torch.zeros_like(paths)
    prev[1:] = paths[:-1]
    prev[torch.cat([torch.ones(1, dtype=torch.bool), request[1:] != request[:-1]])] = 0
    return prev


def train_predictor(routes: Routes, token_ids: Tensor, vocab: int, epochs: int = 20, dim: int = 64,
                    seed: int = 0, lr: float = 1e-2, batch: int = 256) -> PathPredictor:
    """Fit a PathPredictor to a trace's routes (binary cross-entropy on the multi-hot paths)."""
    if routes.num_tokens < 2:
        raise ConfigError("train_predictor: expected a trace of at least 2 tokens")
    torch.manual_seed(seed)
    paths = token_routes(routes)
    prev = _previous(paths, routes.request)
    model = PathPredictor(vocab, routes.num_layers, paths.shape[-1], dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(routes.num_tokens, generator=g).split(batch):
                loss = nn.functional.binary_cross_entropy_with_logits(model(token_ids[idx], prev[idx]), paths[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def predicted_routes(model: PathPredictor, routes: Routes, token_ids: Tensor, width: int | list[int]) -> list[Tensor]:
    """Per layer [N, width] the experts the predictor would prefetch (the previous token's real path known), for
    `moekit.runtime.replay.replay(..., predictions=...)`."""
    paths = token_routes(routes)
    logits = model(token_ids, _previous(paths, routes.request))
    widths = [width] * routes.num_layers if isinstance(width, int) else width
    return [logits[:, i].topk(w, dim=-1).indices for i, w in enumerate(widths)]


class Prefetcher:
    """Drives an `Offloaded` model's store from one of PREFETCH_MODES. Installs itself on every OffloadedExperts and
    (for predictor / pregate) as a forward pre-hook of the input embeddings, to see each step's token ids."""

    def __init__(self, offloaded, mode: str, predictor: PathPredictor | None = None,
                 pregate: Callable[[Tensor], list[Tensor]] | None = None, width: int | None = None):
        if mode not in PREFETCH_MODES:
            raise UnknownNameError(f"unknown prefetch mode {mode!r}; expected one of {', '.join(PREFETCH_MODES)}")
        if offloaded.store is None:
            raise ConfigError("prefetch: the model is fully resident; there is nothing to prefetch")
        pregate = pregate or getattr(offloaded.model, "moekit_pregate", None)
        if mode == "predictor" and predictor is None:
            raise ConfigError("--prefetch predictor: expected a trained path predictor (moekit-predictor.json)")
        if mode == "pregate" and pregate is None:
            raise ConfigError("--prefetch pregate: this model has no pre-gating router (Read-ME); expected a model "
                              "with `moekit_pregate`")
        n = len(offloaded.experts)
        if predictor is not None and (predictor.num_layers != n):
            raise ConfigError(f"path predictor: trained for {predictor.num_layers} MoE layers, the model has {n}")
        from moekit.hf.view import view

        self.mode, self.store, self.predictor, self.pregate = mode, offloaded.store, predictor, pregate
        self.experts = offloaded.experts
        self.routers = [b.router for b in view(offloaded.model)]
        self.width = width
        self.pending: list[set[int]] | None = None
        self.current = torch.zeros(n, max(e.num_experts for e in self.experts.values()))
        self.previous: Tensor | None = None
        self.rows = 0
        self._hook = None
        for e in self.experts.values():
            e.prefetcher = self if mode != "none" else None
        if mode in ("predictor", "pregate"):
            self._hook = offloaded.model.get_input_embeddings().register_forward_pre_hook(self._on_ids)
        self.begin_request()

    def begin_request(self) -> None:
        """A new prompt: no previous token's path; MoE-Infinity's policy starts a new activation matrix."""
        self.previous = None
        if hasattr(self.store.policy, "begin_request"):
            self.store.policy.begin_request()

    def remove(self) -> None:
        for e in self.experts.values():
            e.prefetcher = None
        if self._hook is not None:
            self._hook.remove()

    def _on_ids(self, _module: nn.Module, args: tuple) -> None:
        ids = args[0]  # [B, T] token ids of this forward
        self.rows = ids.shape[-1] if ids.dim() > 1 else 1
        self.pending = None
        if self.rows != 1:
            self.previous = None
            return
        flat = ids.reshape(-1)
        if self.mode == "pregate":
            self.pending = [set(x.reshape(-1).tolist()) for x in self.pregate(ids)]
        else:
            prev = torch.zeros(flat.numel(), *self.current.shape) if self.previous is None \
                else self.previous.expand(flat.numel(), -1, -1)
            with torch.no_grad():
                logits = self.predictor(flat, prev)
            k = self.width or 2
            self.pending = [set(logits[:, i].topk(min(k, logits.shape[-1]), -1).indices.reshape(-1).tolist())
                            for i in range(logits.shape[1])]
        self.store.prefetch([(0, e) for e in sorted(self.pending[0])])

    def after_gate(self, layer: int, hidden: Tensor, chosen: list[int]) -> None:
        """Layer `layer`'s real gate chose `chosen` for `hidden` [T, H]; start reading layer + 1's guesses."""
        protect = [(layer, e) for e in chosen]
        if self.rows == 1:  # decode: remember this token's path (the union over a batch's rows)
            if layer == 0:
                self.current.zero_()
            self.current[layer, chosen] = 1
            if layer == len(self.experts) - 1:
                self.previous = self.current.clone().unsqueeze(0)
        nxt = layer + 1
        if nxt >= len(self.experts):
            return
        if self.mode == "next-layer":
            if hidden.shape[0] > 8:  # prefill: every expert is likely needed; speculation buys nothing
                return
            with torch.no_grad():
                out = self.routers[nxt](hidden)
            idx = out[2] if isinstance(out, tuple) else out
            guess = sorted(set(idx.reshape(-1).tolist()))
        elif self.pending is not None:
            guess = sorted(self.pending[nxt])
        else:
            return
        self.store.prefetch([(nxt, e) for e in guess], protect=protect)
