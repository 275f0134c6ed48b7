"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy: `temperature` > 0, then the `top_k` most likely tokens (0: all), then the
    smallest set whose probability reaches `top_p`; `seed` makes it reproducible."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature}: expected a number above 0 (greedy: sampling=None)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: expected 0 (no limit) or a positive integer")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: expected a number in (0, 1]")



def sample(logits: Tensor, sampling: Sampling | None, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens `[B]` from `logits [B, V]`: argmax when `sampling` is None."""
    if sampling is None:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= sampling.top_p  # the set reaching top_p keeps its last token
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
