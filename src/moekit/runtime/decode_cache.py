"""A KV cache allocated once for the whole generation, with transformers' DynamicCache semantics.

Each layer owns key and value buffers `[B, heads, max_len, head_dim]` allocated at the first update; an update
copies the new states into place (no `torch.cat`, no reallocation per token) and returns a view of the filled
prefix, exactly the tensors transformers' `DynamicLayer` would return (sliding-window layers: the last
`window - 1 + q` positions, as `DynamicSlidingWindowLayer` returns). Attention therefore runs on the same shapes
as in `model.generate`, so greedy tokens agree bit for bit, while the memory is static.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from moekit.errors import ConfigError


class StaticLayer(DynamicLayer):
    """Full attention: the filled prefix `[:, :, :length]` of a preallocated buffer."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h = key_states.shape[:2]
        self._k = key_states.new_zeros(b, h, self.max_len, key_states.shape[-1])
        self._v = value_states.new_zeros(b, value_states.shape[1], self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.max_len:
            raise ConfigError(f"the KV cache holds {self.max_len} positions; {end} were needed (expected a "
                              f"shorter prompt or fewer new tokens)")
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        return q

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_args, **_kwargs):
        self._write(key_states, value_states)
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self._k = self._v = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices].contiguous(), self._v[indices].contiguous()
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def shift(self, n: int) -> None:
        """Move every row's positions `n` places right (n > 0: padding enters on the left) or left (n < 0: the
        first -n positions, padding in every row, leave)."""
        if n == 0 or not self.is_initialized:
            self.length = max(0, self.length + n)
            return
        if self.length + n > self.max_len:
            raise ConfigError(f"the KV cache holds {self.max_len} positions; {self.length + n} were needed")
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = torch.zeros_like(old)
            if n > 0:
                new[:, :, n:n + self.length] = old[:, :, :self.length]
            else:
                new[:, :, :self.length + n] = old[:, :, -n:self.length]
            setattr(self, name, new)
        self.length += n

    def append_rows(self, other: StaticLayer) -> None:
        """Add `other`'s rows (the same length and max_len) after this layer's."""
        if other.length != self.length or other.max_len != self.max_len:
            raise ConfigError("append_rows: expected caches of the same length and size")
        self._k, self._v = torch.cat([self._k, other._k]), torch.cat([self._v, other._v])


class StaticSlidingLayer(DynamicSlidingWindowLayer):
    """Sliding-window attention over the same kind of buffer: returns the last `window - 1 + q` positions, as
    transformers' dynamic sliding layer does (the buffer keeps every position; it is as long as the generation)."""

    def __init__(self, sliding_window: int, max_len: int):
        super().__init__(sliding_window=sliding_window)
        self.full = StaticLayer(max_len)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.full.lazy_initialization(key_states, value_states)
        self.dtype, self.device = key_states.dtype, key_states.device
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_args, **_kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = self.full._write(key_states, value_states)
        self.cumulative_length = self.full.length
        start = max(0, self.full.length - (self.sliding_window - 1 + q))
        keys, values = self.full._k[:, :, start:self.full.length], self.full._v[:, :, start:self.full.length]
        kept = max(0, self.full.length - (self.sliding_window - 1))
        self.keys, self.values = self.full._k[:, :, kept:self.full.length], self.full._v[:, :, kept:self.full.length]
        return keys, values

    def get_seq_length(self) -> int:
        return self.full.length

    def reset(self) -> None:
        self.full.reset()
        self.cumulative_length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.full.batch_select_indices(indices)

    def shift(self, n: int) -> None:
        self.full.shift(n)
        self.cumulative_length = self.full.length

    def append_rows(self, other: StaticSlidingLayer) -> None:
        self.full.append_rows(other.full)


def static_cache(config, max_len: int) -> DynamicCache:
    """A DynamicCache for `config` whose full and sliding layers are preallocated to `max_len` positions. Layer
    kinds other than these two (none in the supported families) keep transformers' own dynamic layers."""
    cache = DynamicCache(config=config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            layers.append(StaticSlidingLayer(layer.sliding_window, max_len))
        elif type(layer) is DynamicLayer:
            layers.append(StaticLayer(max_len))
        else:
            layers.append(layer)
    cache.layers = layers
    return cache
