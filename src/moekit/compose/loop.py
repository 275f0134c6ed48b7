"""A small training loop for adapters and mixtures, and perplexity on token windows.

moekit's trainer (`moekit.train.trainer.train`) builds and pre-trains a model from a recipe; fine-tuning adapters
on a given base model does not fit it, so compose trains here: AdamW on the given parameters only, the causal-LM
loss plus, for mixtures, the auxiliary losses the routing rules return (collected explicitly by `aux`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from moekit.errors import ConfigError


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ids [B, L] (every position but the last predicts the next)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def fit(model: nn.Module, windows: Tensor, params: Iterable[nn.Parameter], steps: int, lr: float = 1e-3,
        batch_size: int = 8, seed: int = 0, aux: Callable[[], Tensor] | None = None, aux_weight: float = 0.0,
        labels: Tensor | None = None, on_batch: Callable[[Tensor | None], None] | None = None,
        progress: bool = True, desc: str = "train") -> dict:
    """Train `params` for `steps` steps on windows [N, L] (batches drawn with a seeded generator). aux() is read
    after each forward and added with aux_weight; labels [N] (one per window), if given, are expanded to tokens
    [B, L] and handed to on_batch before each forward (LoRA-Mixer's specialisation loss). Returns
    {"steps", "tokens", "first_loss", "last_loss", "losses"} (losses: the LM loss of every step)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps={steps}, batch_size={batch_size}, lr={lr}; expected positive values")
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise ConfigError(f"training windows of shape {tuple(windows.shape)}; expected [windows, seq_len]")
    device = params[0].device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False):
            pick = torch.randint(0, windows.shape[0], (batch_size,), generator=generator)
            batch = windows[pick].to(device)
            if on_batch is not None:
                on_batch(None if labels is None else labels[pick].unsqueeze(1).expand_as(batch).to(device))
            loss = lm_loss(model, batch)
            total = loss + aux_weight * aux() if aux is not None and aux_weight else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        if on_batch is not None:
            on_batch(None)
    return {"steps": steps, "tokens": steps * batch_size * windows.shape[1], "first_loss": losses[0],
            "last_loss": losses[-1], "losses": losses}


@torch.no_grad()
def evaluate_ppl(model: nn.Module, windows: Tensor | dict[str, Tensor], batch_size: int = 8,
                 progress: bool = False) -> float | dict[str, float]:
    """Perplexity over windows [N, L] (each window scored on its own, its first token as context only); a dict of
    windows gives {name: perplexity}. For documents with strided context use moekit.eval.perplexity."""
    if isinstance(windows, dict):
        return {name: evaluate_ppl(model, w, batch_size, progress) for name, w in windows.items()}
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ConfigError(f"evaluation windows of shape {tuple(windows.shape)}; expected [windows >= 1, seq_len >= 2]")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress,
                      file=sys.stderr, leave=False):
        batch = windows[start:start + batch_size].to(device)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(lm_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)
