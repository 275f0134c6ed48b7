"""A lean decode loop over any bridged family: a preallocated KV cache, one model call per token, the logits of the
last position only, no generation-config machinery per step.

```python
model, tok = load_for_decode(None, dtype="fp32")          # moekit-tiny, experts through moekit's dispatch
dec = Decoder(model)
result = dec.generate(tok("def f(x):", return_tensors="pt").input_ids, max_new_tokens=32)
print(tok.decode(result.tokens[0]), result.decode_tokens_per_s)
```

A batch of sequences of different lengths is left-padded (`pad_batch`) and decoded together: `prefill(ids [B, T],
attention_mask [B, T])`, then `step(tokens [B])`; each row keeps its own positions (padding takes none), as in
transformers' batched `generate`. Greedy decoding gives transformers' `generate(do_sample=False)` tokens exactly in
fp32, because every call runs the model's own modules on the tensors transformers' dynamic cache would give them.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.runtime.decode_cache import StaticLayer, static_cache
from moekit.runtime.decode_lean import LeanStep
from moekit.runtime.decode_sampling import Sampling, sample

__all__ = ["DTYPES", "Decoder", "GenerationResult", "Sampling", "choose_accelerate", "context_length",
           "load_for_decode", "pad_batch", "sample"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GenerationResult:
    """`tokens[b]`: the new tokens of row b (up to and including its end-of-sequence token). Timings in seconds:
    `prefill_s` the prompt's forward, `decode_s` the `decode_steps` one-token steps after it (callbacks excluded);
    rates are tokens per second of each phase (prefill: prompt tokens of all rows; decode: steps x rows)."""

    tokens: list[list[int]]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int = 1
    stop_reason: list[str] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch / self.decode_s if self.decode_s > 0 else float("nan")


def context_length(config) -> int | None:
    """The longest sequence the model's position embeddings were configured for (None when unstated)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to one `[B, T]` batch; returns `(input_ids, attention_mask)` (0 on padding)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ConfigError("sequences: expected at least one sequence, each of at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _eos_ids(model: nn.Module) -> set[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def _pad_id(model: nn.Module, eos: set[int]) -> int:
    gen = getattr(model, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    return int(pad[0] if isinstance(pad, list | tuple) else pad)


class Decoder:
    """Prefill and one-token steps of `model` over a KV cache of `max_len` positions (default: the model's
    context). `compile=True` compiles the model's forward for one-token steps with `torch.compile(dynamic=True)`
    (the first steps take a minute or more; measure before using it: `moekit bench decode --compile` does).
    `lean`: one-token steps of one unpadded row of a Llama-shaped or DeepSeek-V2/V3 family call the model's modules
    directly (`moekit.runtime.decode_lean`; same tensors, same tokens); `self.lean` says whether the model
    qualified."""

    def __init__(self, model: nn.Module, max_len: int | None = None, compile: bool = False, lean: bool = True):
        self.model = model
        self.context = context_length(model.config)
        self.max_len = max_len or self.context
        if self.max_len is None:
            raise ConfigError("max_len: the model's config states no max_position_embeddings; pass max_len")
        if self.context is not None and self.max_len > self.context:
            raise ConfigError(f"max_len={self.max_len}: the model's context is {self.context} positions")
        params = inspect.signature(model.forward).parameters
        self._kw: dict = {"use_cache": True}
        if "logits_to_keep" in params:
            self._kw["logits_to_keep"] = 1
        if "output_router_logits" in params:
            self._kw["output_router_logits"] = False
        if compile:
            from moekit.hf import is_accelerated, view

            if view(model) and is_accelerated(model):
                raise ConfigError("compile=True: torch.compile cannot trace moekit's dispatch in this torch "
                                  "(data-dependent expert slices); expected the model with transformers' experts "
                                  "(moekit.hf.restore(model), or --experts transformers)")
        # compiled: one-token steps only (their shapes vary in the cache length alone); prefill stays eager, as
        # every new prompt length would otherwise recompile
        self._step_forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        self.lean = lean and not compile
        self._lean: LeanStep | None = None
        self.eos = _eos_ids(model)
        self.pad_token_id = _pad_id(model, self.eos)
        self.cache = None
        self.length = 0  # positions filled in the cache (padding included)
        self.positions: Tensor | None = None  # [B]: the next position of each row
        self.mask: Tensor | None = None  # [B, capacity] 1 where a real token sits; None: no padding
        self.capacity = self.max_len  # positions the current cache holds
        self.device = next(model.parameters()).device

    @property
    def batch(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[0])

    def reset(self, capacity: int | None = None) -> None:
        """Drop the sequences; the next cache holds `capacity` positions (default `max_len`), allocated at the
        first forward."""
        self.capacity = min(capacity or self.max_len, self.max_len)
        self.cache = static_cache(self.model.config, self.capacity)
        if self.cache.layer_class_to_replicate is not None:
            self.cache.layer_class_to_replicate = functools.partial(StaticLayer, self.capacity)
        if self.lean and self._lean is None:
            self.lean = LeanStep.supports(self.model, self.cache)
            self._lean = LeanStep(self.model, self.max_len) if self.lean else None
        self.length, self.positions, self.mask = 0, None, None

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.capacity:
            where = f"the model's context is {self.context}" if self.capacity == self.context else \
                f"the cache holds {self.capacity} positions"
            raise ConfigError(f"prompt and generation need {self.length + tokens} positions; {where} (expected a "
                              f"shorter prompt or fewer new tokens)")

    @torch.inference_mode()
    def run(self, ids: Tensor, position_ids: Tensor, mask: Tensor | None) -> Tensor:
        """One forward of ids [B, T] at position_ids [B, T] with mask [B, filled + T] (None: no padding) over the
        cache; the last position's logits [B, V] float32. Positions, mask and length are the caller's to update."""
        forward = self._step_forward if ids.shape[1] == 1 else self.model.forward
        out = forward(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                      **self._kw)
        return out.logits[:, -1].float()

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, capacity: int | None = None
                ) -> Tensor:
        """Start new sequences: `input_ids [B, T]` (or `[T]`), left-padded where `attention_mask [B, T]` is 0.
        Returns the logits of each row's last position, `[B, V]` float32. The cache holds `capacity` positions
        (default `max_len`: with a long-context model, pass what the sequences will need)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ConfigError(f"input_ids: expected [T] or [B, T] with T >= 1, got shape {list(ids.shape)}")
        self.reset(capacity)
        self._check_room(ids.shape[1])
        ids = ids.to(self.device)
        if attention_mask is not None and bool((torch.as_tensor(attention_mask) == 1).all()):
            attention_mask = None
        if attention_mask is None:
            position_ids = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
            self.positions = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=self.device)
            mask = None
        else:
            mask = torch.as_tensor(attention_mask, dtype=torch.long).to(self.device)
            if mask.shape != ids.shape:
                raise ConfigError(f"attention_mask: expected shape {list(ids.shape)} like input_ids, got "
                                  f"{list(mask.shape)}")
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            self.positions = mask.sum(-1)
            self.mask = torch.zeros((ids.shape[0], self.capacity), dtype=torch.long, device=self.device)
            self.mask[:, :ids.shape[1]] = mask
        logits = self.run(ids, position_ids, mask)
        self.length = ids.shape[1]
        return logits

    def step(self, token_ids: Tensor | Sequence[int] | int) -> Tensor:
        """Append one token to each row (`[B]`, or an int for one row); returns the next logits `[B, V]`."""
        if self.positions is None:
            raise ConfigError("step: no sequence started; expected prefill(input_ids) first")
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1, 1)
        if ids.shape[0] != self.batch:
            raise ConfigError(f"token_ids: expected {self.batch} tokens (one per row), got {ids.shape[0]}")
        self._check_room(1)
        mask = None
        if self.mask is not None:
            self.mask[:, self.length] = 1
            mask = self.mask[:, :self.length + 1]
        if self._lean is not None and mask is None and self.batch == 1:  # one unpadded row: position == length
            logits = self._lean(ids.view(1, 1), self.length, self.cache).float()
        else:
            logits = self.run(ids, self.positions.unsqueeze(1), mask)
        self.positions += 1
        self.length += 1
        return logits

    def static_layers(self) -> list:
        """The cache's layers, each one of moekit's static layers (rows can be appended, shifted, selected)."""
        layers = self.cache.layers
        if not all(hasattr(layer, "append_rows") for layer in layers):
            raise ConfigError("add/remove: a cache layer of this model is not one of moekit's static layers; "
                              "expected full or sliding-window attention")
        return layers

    def full_mask(self) -> Tensor:
        """The mask [B, capacity] (1 where a real token sits), made explicit where there was no padding (None)."""
        if self.mask is None:
            self.mask = torch.zeros((self.batch, self.capacity), dtype=torch.long, device=self.device)
            self.mask[:, :self.length] = 1
        return self.mask

    def _shift(self, n: int) -> None:
        """Every row `n` positions right (padding on the left) or, n < 0, left (dropping shared left padding)."""
        for layer in self.static_layers():
            layer.shift(n)
        self.full_mask()
        new = torch.zeros_like(self.mask)
        if n >= 0:
            new[:, n:n + self.length] = self.mask[:, :self.length]
        else:
            new[:, :self.length + n] = self.mask[:, -n:self.length]
        self.mask, self.length = new, self.length + n

    def add(self, input_ids: Tensor | Sequence[int]) -> Tensor:
        """Continuous batching: start one more sequence (`[T]`) beside the running ones; it becomes the last row.
        Returns its next-token logits `[V]`. Its prompt is prefilled alone, then its cache is left-padded (or the
        running rows are) so that all rows end at the same cache position."""
        if self.positions is None:
            return self.prefill(input_ids)[0]
        other = Decoder(self.model, self.max_len, lean=False)
        logits = other.prefill(input_ids, capacity=self.capacity)
        if other.batch != 1:
            raise ConfigError(f"input_ids: expected one sequence [T], got {other.batch} rows")
        end = max(self.length, other.length)
        if end >= self.capacity:
            raise ConfigError(f"add: the running rows and the new one need {end + 1} positions; the cache holds "
                              f"{self.capacity}")
        self.join(other)
        return logits[0]

    def join(self, other: Decoder) -> None:
        """Take the rows of `other` (prefilled with the same capacity) as the last rows of this batch: whichever
        side is shorter is left-padded so that all rows end at the same cache position."""
        end = max(self.length, other.length)
        self._shift(end - self.length)
        other._shift(end - other.length)
        for mine, theirs in zip(self.static_layers(), other.static_layers(), strict=True):
            mine.append_rows(theirs)
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])

    def remove(self, rows: Sequence[int]) -> None:
        """Drop these rows (finished sequences); the others keep their order. Left padding every remaining row
        shares is dropped too, so the cache does not fill with it."""
        drop = set(rows)
        if not drop <= set(range(self.batch)):
            raise ConfigError(f"rows={sorted(drop)}: expected row indices below {self.batch}")
        keep = torch.tensor([r for r in range(self.batch) if r not in drop], dtype=torch.long)
        if len(keep) == 0:
            self.reset()
            return
        for layer in self.static_layers():
            layer.batch_select_indices(keep)
        self.full_mask()
        self.mask, self.positions = self.mask[keep], self.positions[keep]
        used = self.mask[:, :self.length].any(0).nonzero()
        if len(used) and int(used[0]) > 0:
            self._shift(-int(used[0]))

    def generate(self, prompt_ids: Tensor | Sequence[int], max_new_tokens: int, sampling: Sampling | None = None,
                 on_token: Callable[[list[int]], object] | None = None, attention_mask: Tensor | None = None,
                 stop_at_eos: bool = True) -> GenerationResult:
        """Up to `max_new_tokens` per row after `prompt_ids` (`[T]` or left-padded `[B, T]` with
        `attention_mask`). Greedy unless `sampling`. A row ends at the model's end-of-sequence token (then it gets
        padding, as in transformers); all rows ended: the loop stops. `on_token(tokens)` gets each step's tokens,
        one per row."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: expected a positive integer")
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ConfigError(f"prompt_ids: expected [T] or [B, T] with T >= 1, got shape {list(ids.shape)}")
        if self.context is not None and ids.shape[1] > self.context:
            raise ConfigError(f"the prompt has {ids.shape[1]} tokens; the model's context is {self.context} "
                              f"(expected a shorter prompt)")
        self.reset()
        self._check_room(ids.shape[1] + max_new_tokens - 1)
        capacity = ids.shape[1] + max_new_tokens - 1  # a cache as long as this request needs, not the context
        gen = torch.Generator().manual_seed(sampling.seed) if sampling and sampling.seed is not None else None
        eos = torch.tensor(sorted(self.eos), dtype=torch.long) if stop_at_eos and self.eos else None
        start = time.perf_counter()
        logits = self.prefill(ids, attention_mask, capacity)
        prefill_s = time.perf_counter() - start
        prompt_tokens = int(ids.numel() if attention_mask is None else torch.as_tensor(attention_mask).sum())
        batch = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool)
        callback_s, steps = 0.0, 0
        start = time.perf_counter()
        while True:
            tokens = torch.where(done, self.pad_token_id, sample(logits, sampling, gen).cpu())
            for row, t in enumerate(tokens.tolist()):
                if not done[row]:
                    out[row].append(t)
            if eos is not None:
                done |= torch.isin(tokens, eos)
            if on_token is not None:
                c0 = time.perf_counter()
                on_token(tokens.tolist())
                callback_s += time.perf_counter() - c0
            if steps + 1 >= max_new_tokens or bool(done.all()):
                break
            logits = self.step(tokens)
            steps += 1
        decode_s = time.perf_counter() - start - callback_s
        reasons = ["eos" if d else "length" for d in done.tolist()]
        return GenerationResult(tokens=out, prompt_tokens=prompt_tokens, new_tokens=sum(len(o) for o in out),
                                prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, batch=batch,
                                stop_reason=reasons)


def choose_accelerate(model: nn.Module, steps: int = 8) -> bool:
    """Whether `model` decodes faster with its experts through moekit's dispatch than through transformers' own
    forward: a `steps`-token greedy decode timed both ways (interleaved rounds, medians; `moekit.core.tune`). With
    tuning off (`MOEKIT_TUNE=0`) the documented default: moekit's dispatch. False without measuring when no block
    has transformers' experts (compressed experts run their own forward). Leaves `model` as chosen."""
    import moekit.hf as mh
    from moekit.core import tune

    if not any(isinstance(getattr(b.experts.module, "down_proj", None), nn.Parameter) for b in mh.view(model)):
        return False  # no transformers experts to swap (quantized or otherwise compressed: their own forward)
    if not tune.enabled():
        mh.accelerate(model)
        return True
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    ids = torch.arange(steps).remainder(vocab).unsqueeze(0)
    dec = Decoder(model, max_len=min(2 * steps, context_length(model.config) or 2 * steps))

    def run(accelerated: bool):
        (mh.accelerate if accelerated else mh.restore)(model)
        return dec.generate(ids, steps, stop_at_eos=False)

    ms = tune.measure_ms({"moekit": lambda: run(True), "transformers": lambda: run(False)}, budget_ms=300.0)
    chosen = ms["moekit"] <= ms["transformers"]
    (mh.accelerate if chosen else mh.restore)(model)
    return chosen


def load_for_decode(model_path: str | None = None, dtype: str = "fp32", accelerate: bool | str = "auto",
                    attn_implementation: str | None = None) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` ready for `Decoder`: moekit-tiny when `model_path` is None, else any bridged family
    through `moekit.hf.load` (checked). `dtype`: fp32 or bf16. `accelerate`: True runs the experts through moekit's
    dispatch (`moekit.hf.accelerate`, whose `auto` picks the implementation; compressed experts keep their own
    forward), False keeps transformers' experts, "auto" times both (`choose_accelerate`)."""
    from transformers import AutoTokenizer

    import moekit.hf as mh
    from moekit.default import default_model_path

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if accelerate not in (True, False, "auto"):
        raise ConfigError(f"accelerate={accelerate!r}: expected True, False or 'auto'")
    path = default_model_path() if model_path is None else model_path
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = mh.load(path, dtype=DTYPES[dtype], **kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: no usable tokenizer ({reason}); expected tokenizer.json or the tokenizer files "
                          f"transformers reads beside config.json") from None
    if accelerate == "auto":
        choose_accelerate(model)
    elif accelerate:
        mh.accelerate(model)
    return model, tokenizer
