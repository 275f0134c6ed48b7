"""Calibration: run the model on calibration tokens and keep, per MoE block, what the compression methods read.

Per block: its input hidden states x [T, H] (reconstruction, merging by output similarity, HEAPr), the family's
own routing of them (router logits [T, E] for M-SMoE's similarity, top-k indices and weights [T, k] for routing
frequency and TCESS), and optionally the gradient of the summed next-token loss at the block's output g [T, H]
(HEAPr's M = E[g g^T]). Everything is found through `moekit.hf.view` and forward hooks, so it works on every
family. The model is not changed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from moekit.data import DataError, TextDoc, context_length, windows
from moekit.hf.view import BlockView, view


class CalibrationWarning(UserWarning):
    """The calibration data left some experts unseen (their statistics are zero)."""


@dataclass
class LayerStats:
    """One MoE block on the calibration tokens. x / grad: [T, H] (grad None unless asked for); logits [T, E];
    weights / indices [T, k]; domain [T]: index into Stats.domains (-1: no label)."""

    layer: int
    x: Tensor
    grad: Tensor | None
    logits: Tensor
    weights: Tensor
    indices: Tensor
    domain: Tensor

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    def counts(self, domain: int | None = None) -> Tensor:
        """Top-k selections per expert [E] (on tokens of one domain when given)."""
        idx = self.indices if domain is None else self.indices[self.domain == domain]
        return torch.bincount(idx.flatten(), minlength=self.num_experts).float()

    def gate_weight(self) -> Tensor:
        """Routing weight of every expert for every token [T, E] (0 where not selected)."""
        dense = torch.zeros_like(self.logits)
        return dense.scatter_add_(1, self.indices, self.weights.float())


@dataclass
class Stats:
    layers: list[LayerStats]
    tokens: int
    domains: list[str] = field(default_factory=list)

    def domain_index(self, name: str) -> int:
        if name not in self.domains:
            raise DataError(f"task={name!r}: no calibration document has that domain; expected one of "
                            f"{', '.join(self.domains) or '(the data has no domain labels)'}")
        return self.domains.index(name)


def token_windows(tokenizer, docs: Sequence[TextDoc], model: nn.Module, max_tokens: int,
                  seq_len: int = 256) -> list[tuple[Tensor, str | None]]:
    """(ids [L], domain) windows of `docs`, at most `max_tokens` tokens in all."""
    seq_len = min(seq_len, context_length(model))
    return [(w.ids, w.domain) for w in windows(tokenizer, docs, seq_len, max_tokens) if len(w.ids) > 1]


def _output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _route_all(block: BlockView, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dtype = block.router_params()["weight"].dtype
    logits, weights, indices = block.router(x.to(dtype))
    return logits.float(), weights.float(), indices.long()


def calibrate(model: nn.Module, token_windows: Sequence[tuple[Tensor, str | None]], grads: bool = False,
              progress: bool = True) -> Stats:
    """Run `model` (eval mode) on (ids [L], domain) windows and collect every MoE block's statistics. With
    `grads`, also the gradient of the summed next-token loss at each block's output (one backward per window)."""
    if not token_windows:
        raise DataError("calibration data: no window of two or more tokens; expected more text")
    blocks = view(model)
    names = sorted({d for _, d in token_windows if d is not None})
    xs: list[list[Tensor]] = [[] for _ in blocks]
    gs: list[list[Tensor]] = [[] for _ in blocks]
    outs: list[Tensor] = []
    domains: list[Tensor] = []

    def pre_hook(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            xs[i].append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
        return hook

    def post_hook(_module, _args, out):
        outs.append(_output(out))

    handles = [b.block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    if grads:
        handles += [b.block.register_forward_hook(post_hook) for b in blocks]
    embed = model.get_input_embeddings()
    try:
        for ids, domain in tqdm(token_windows, desc="calibration", unit="window", disable=not progress, leave=False):
            ids = ids.reshape(1, -1)
            domains.append(torch.full((ids.shape[1],), names.index(domain) if domain is not None else -1))
            if not grads:
                with torch.no_grad():
                    model(input_ids=ids)
                continue
            outs.clear()
            with torch.enable_grad():
                emb = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                for i, g in enumerate(torch.autograd.grad(loss, outs, allow_unused=True)):
                    gs[i].append(torch.zeros_like(outs[i]) if g is None else g.detach().reshape(-1, g.shape[-1]))
    finally:
        for h in handles:
            h.remove()
    layers = []
    for i, block in enumerate(blocks):
        x = torch.cat(xs[i])
        logits, weights, indices = _route_all(block, x)
        grad = torch.cat(gs[i]).float().reshape(x.shape) if grads else None
        layers.append(LayerStats(block.layer, x, grad, logits, weights, indices, torch.cat(domains)))
    stats = Stats(layers, int(sum(len(ids) for ids, _ in token_windows)), names)
    _warn_unseen(stats)
    return stats


def _warn_unseen(stats: Stats) -> None:
    unseen = {s.layer: (s.counts() == 0).nonzero().flatten().tolist() for s in stats.layers}
    unseen = {layer: e for layer, e in unseen.items() if e}
    if unseen:
        count = sum(len(e) for e in unseen.values())
        where = "; ".join(f"layer {layer}: {e}" for layer, e in unseen.items())
        warnings.warn(f"calibration data: {stats.tokens} tokens left {count} experts never selected ({where}); "
                      f"their statistics are zero, so they rank as least used (give more text to see them)",
                      CalibrationWarning, stacklevel=2)
