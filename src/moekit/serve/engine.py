"""The serving engine: continuous batching over `moekit.runtime.decode.Decoder`, independent of HTTP.

Requests go through three stages. `pending`: submitted, not yet run (bounded by `max_queue`; beyond it `submit`
raises QueueFull). `ready`: prefilled alone (own 1-row KV cache), first-token logits and the experts its last
prompt token used kept, waiting for a slot. `running`: a row of the one batched Decoder; every engine step runs one
forward over all running rows (left-padded, per-row positions and attention mask), samples one token per row
with that row's own settings and generator, and drops the rows that finished (their cache rows freed). New
requests join between steps.

Expert-aware batching (ExpertFlow): when more requests are ready than slots are free, `runtime.schedule.pick_batch`
chooses the ones whose experts (from their last step: the prefill's last token) add fewest experts to those the
running rows used in the last step; a request waiting `max_wait` steps is taken first (bounded wait).
`scheduler="first-come"` takes the longest-waiting instead. Each step records the distinct (layer, expert) pairs its
forward activated.

Events go to each request's `emit(event: dict)` from the engine thread: {"type": "delta", "text"} as text becomes
final (held back while it could still be the start of a stop string or ends inside a multi-byte character), then
{"type": "done", "finish_reason": "stop" | "length", "text", "usage"}.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.inspect.layers import find_layers, routing_hooks
from moekit.runtime.decode import Decoder, Sampling, sample
from moekit.runtime.decode_rows import compact, rows_supported, step_rows
from moekit.runtime.schedule import pick_batch, pick_first_come


class RequestError(MoekitError, ValueError):
    """A request the engine cannot run (its `param` names the field)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(MoekitError, RuntimeError):
    """More requests are waiting than the engine's queue holds."""


def choose_ready(running: list[set[int]], ready: list[set[int]], waited: list[int], free: int, max_wait: int,
                 pick=pick_batch) -> list[int]:
    """Which ready requests (indices) take the `free` rows: all when they fit; else `pick` (pick_batch or
    pick_first_come) with the running rows' experts as a pseudo-request that has waited longest, so the choice
    starts from the experts the batch already activates."""
    if len(ready) <= free:
        return list(range(len(ready)))
    base = set().union(*running) if running else set()
    chosen = pick([base, *ready], free + 1, [1 << 30, *waited], max_wait)
    return [i - 1 for i in chosen if i > 0][:free]


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[dict], object]
    sampling: Sampling | None = None  # None: greedy
    stop: tuple[str, ...] = ()
    id: str = ""


@dataclass
class _Seq:
    req: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    decoder: Decoder | None = None  # own cache while ready
    logits: torch.Tensor | None = None  # [V] next-token logits while ready
    experts: set[int] = field(default_factory=set)
    waited: int = 0
    finish: str | None = None
    cancelled: bool = False
    text: str = ""


class Engine:
    """Continuous batching of `model` (a transformers causal LM of a bridged family, eval mode) with `tokenizer`.
    `max_batch`: rows per forward; `max_running`: sequences resident in the KV cache (default max_batch; more
    lets the scheduler choose each step's rows among them); `max_queue`: requests waiting beyond the running ones;
    `max_wait`: steps a sequence can be passed over; `scheduler`: "expert" or "first-come"; `store`: an offload
    ExpertStore whose hit rate /metrics reports."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_queue: int = 64, max_wait: int = 8,
                 scheduler: str = "expert", max_len: int | None = None, store=None, max_running: int | None = None):
        if max_batch < 1:
            raise RequestError(f"--max-batch {max_batch}: expected at least 1", "max_batch")
        max_running = max_running or max_batch
        if max_running < max_batch:
            raise RequestError(f"--max-running {max_running}: expected at least --max-batch {max_batch}",
                               "max_running")
        if scheduler not in ("expert", "first-come"):
            raise RequestError(f"scheduler={scheduler!r}: expected 'expert' or 'first-come'", "scheduler")
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_batch, self.max_queue, self.max_wait = max_batch, max_queue, max_wait
        self.max_running = max_running
        self.pick = pick_batch if scheduler == "expert" else pick_first_come
        self.scheduler = scheduler
        self.decoder = Decoder(model, max_len)
        self.context = self.decoder.max_len
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0) or None
        self.layers = find_layers(model)
        self.num_experts = max(ly.num_experts for ly in self.layers)
        self.pending: deque[_Seq] = deque()
        self.ready: list[_Seq] = []
        self.running: list[_Seq] = []
        self.lock = threading.Condition()
        self._routing: dict[int, torch.Tensor] = {}
        self._by_token: dict[int, set[int]] = {}  # token id -> experts it was last routed to (pre-gating guess)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "requests_finished": 0, "requests_cancelled": 0, "requests_rejected": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "batch_rows": 0,
                      "activated_experts": 0, "last_batch": 0, "last_activated": 0}

    # ---- requests -------------------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raises RequestError when the request cannot fit the model's context."""
        if not prompt_ids:
            raise RequestError("prompt: encodes to no tokens; expected some text", "prompt")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt: token ids must lie in [0, {self.vocab_size})", "prompt")
        if len(prompt_ids) >= self.context:
            raise RequestError(f"This model's maximum context length is {self.context} tokens; the prompt has "
                               f"{len(prompt_ids)} tokens", "prompt", "context_length_exceeded")
        if max_tokens < 1:
            raise RequestError(f"max_tokens={max_tokens}: expected a positive integer", "max_tokens")
        if len(prompt_ids) + max_tokens > self.context:
            raise RequestError(f"This model's maximum context length is {self.context} tokens; the prompt "
                               f"({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceed it",
                               "max_tokens", "context_length_exceeded")

    def submit(self, req: Request) -> None:
        self.check(req.prompt_ids, req.max_tokens)
        seed = req.sampling.seed if req.sampling is not None else None
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with self.lock:
            if len(self.pending) + len(self.ready) >= self.max_queue:
                self.stats["requests_rejected"] += 1
                raise QueueFull(f"{len(self.pending) + len(self.ready)} requests are waiting; the queue holds "
                                f"{self.max_queue}. Retry later")
            self.pending.append(_Seq(req, gen))
            self.stats["requests"] += 1
            self.lock.notify()

    def cancel(self, req_id: str) -> None:
        """The client went away: the request leaves at the next step (its slot and cache row freed)."""
        with self.lock:
            for s in (*self.pending, *self.ready, *self.running):
                if s.req.id == req_id:
                    s.cancelled = True

    @property
    def queue_depth(self) -> int:
        return len(self.pending) + len(self.ready)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.ready or self.running)

    # ---- one engine step ------------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled requests, prefill waiting requests (as many as rows are free, else one), admit ready
        ones into free rows, decode one token for every running row, retire finished rows."""
        with self.lock:
            self._drop_cancelled()
            # fill the free rows at once; with none free, keep one more request prefilled (ready holds max_batch)
            n = min(max(1, self.max_running - len(self.running) - len(self.ready)), self.max_batch - len(self.ready))
            seqs = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        for seq in seqs:
            self._prefill(seq)
        self._admit()
        self._retire()
        if self.running:
            self._decode()
            self._retire()

    def _drop_cancelled(self) -> None:
        gone = [s for s in (*self.pending, *self.ready) if s.cancelled]
        self.pending = deque(s for s in self.pending if not s.cancelled)
        self.ready = [s for s in self.ready if not s.cancelled]
        rows = [r for r, s in enumerate(self.running) if s.cancelled]
        if rows:
            self.decoder.remove(rows)
            gone += [self.running[r] for r in rows]
            self.running = [s for s in self.running if not s.cancelled]
        self.stats["requests_cancelled"] += len(gone)

    def _forward(self, fn):
        self._routing.clear()
        with routing_hooks(self.layers, lambda i, r: self._routing.__setitem__(i, r.indices)):
            return fn()

    def _row_experts(self, row: int) -> set[int]:
        return {i * self.num_experts + int(e) for i, idx in self._routing.items() for e in idx[row].tolist()}

    def _prefill(self, seq: _Seq) -> None:
        seq.decoder = Decoder(self.model, self.context)
        seq.logits = self._forward(lambda: seq.decoder.prefill(torch.tensor(seq.req.prompt_ids)))[0]
        seq.experts = self._row_experts(-1)
        for t, token in enumerate(seq.req.prompt_ids):
            self._by_token[token] = self._row_experts(t)
        self.stats["prompt_tokens"] += len(seq.req.prompt_ids)
        with self.lock:
            self.ready.append(seq)

    def _admit(self) -> None:
        with self.lock:
            free = self.max_running - len(self.running)
            if not self.ready or free <= 0:
                return
            chosen = choose_ready([s.experts for s in self.running], [s.experts for s in self.ready],
                                  [s.waited for s in self.ready], free, self.max_wait, self.pick)
            picked = [self.ready[i] for i in chosen]
            self.ready = [s for i, s in enumerate(self.ready) if i not in set(chosen)]
            for s in self.ready:
                s.waited += 1
        for s in picked:
            self._join(s)
            self._accept(s, sample(s.logits[None], s.req.sampling, s.generator)[0].item())
            s.decoder, s.logits = None, None

    def _join(self, seq: _Seq) -> None:
        """Seq's prefilled 1-row cache becomes the last row of the running batch (as Decoder.add joins a prompt)."""
        if not self.running:
            self.decoder = seq.decoder
        else:
            self.decoder.join(seq.decoder)
        seq.waited = 0
        self.running.append(seq)

    def _decode(self) -> None:
        """One forward: every running row, or, with more rows resident than `max_batch`, the rows `pick` chooses
        from their predicted experts (bounded wait); the rows left out get a masked hole at this position."""
        if self.decoder.length + 1 > self.decoder.max_len and self.decoder.mask is not None:
            compact(self.decoder)  # holes left by rows that sat out steps
            self.stats["compactions"] = self.stats.get("compactions", 0) + 1
        rows = list(range(len(self.running)))
        if len(rows) > self.max_batch and rows_supported(self.decoder):
            rows = sorted(self.pick([self.predicted(s) for s in self.running], self.max_batch,
                                    [s.waited for s in self.running], self.max_wait))
        tokens = torch.tensor([self.running[r].tokens[-1] for r in rows])
        if len(rows) == len(self.running):
            logits = self._forward(lambda: self.decoder.step(tokens))
        else:
            logits = self._forward(lambda: step_rows(self.decoder, rows, tokens))
        activated = set()
        for i, r in enumerate(rows):
            self.running[r].experts = self._row_experts(i)
            self._by_token[int(tokens[i])] = self.running[r].experts
            activated |= self.running[r].experts
        chosen = set(rows)
        for r, s in enumerate(self.running):
            s.waited = 0 if r in chosen else s.waited + 1
        st = self.stats
        st["steps"] += 1
        st["batch_rows"] += len(rows)
        st["activated_experts"] += len(activated)
        st["last_batch"], st["last_activated"] = len(rows), len(activated)
        st["max_wait_seen"] = max(st.get("max_wait_seen", 0), *(s.waited for s in self.running))
        for i, r in enumerate(rows):
            s = self.running[r]
            self._accept(s, sample(logits[i:i + 1], s.req.sampling, s.generator)[0].item())

    def predicted(self, seq: _Seq) -> set[int]:
        """The experts `seq`'s next step is expected to use: those its next input token was routed to when last
        seen (Read-ME's pre-gating idea: routing follows the token), else its own last step's."""
        return self._by_token.get(seq.tokens[-1], seq.experts) if seq.tokens else seq.experts

    def _accept(self, seq: _Seq, token: int) -> None:
        """Append a sampled token: emit the text that became final, decide whether the request ended."""
        seq.tokens.append(token)
        self.stats["completion_tokens"] += 1
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if token in self.decoder.eos:
            seq.finish = "stop"
        for stop in seq.req.stop:
            at = text.find(stop)
            if at >= 0:
                text, seq.finish = text[:at], "stop"
        if seq.finish is None and len(seq.tokens) >= seq.req.max_tokens:
            seq.finish = "length"
        safe = len(text)
        if seq.finish is None:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for stop in seq.req.stop:  # hold back a tail that may start a stop string
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:n]):
                        safe -= n
                        break
        if safe > seq.sent:
            seq.req.emit({"type": "delta", "text": text[seq.sent:safe]})
            seq.sent = safe
        seq.text = text

    def _retire(self) -> None:
        rows = [r for r, s in enumerate(self.running) if s.finish is not None]
        for r in rows:
            s = self.running[r]
            n = len(s.tokens)
            s.req.emit({"type": "done", "finish_reason": s.finish, "text": s.text,
                        "usage": {"prompt_tokens": len(s.req.prompt_ids), "completion_tokens": n,
                                  "total_tokens": len(s.req.prompt_ids) + n}})
        if rows:
            self.decoder.remove(rows)
            self.running = [s for s in self.running if s.finish is None]
            self.stats["requests_finished"] += len(rows)

    # ---- the engine thread ----------------------------------------------------------------------------------
    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until nothing is pending, ready or running (tests and benchmarks without a thread)."""
        for _ in range(max_steps):
            if not self.busy:
                return
            self.step()

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.busy:
                    self.lock.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 (a failed step ends its requests, never the server)
                self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        with self.lock:
            seqs = [*self.running, *self.ready, *self.pending]
            self.running, self.ready, self.pending = [], [], deque()
            self.decoder.reset()
        for s in seqs:
            s.req.emit({"type": "error", "message": f"engine step failed: {type(err).__name__}: {err}"})

    def metrics(self) -> dict:
        st = dict(self.stats)
        st["queue_depth"] = self.queue_depth
        st["running"] = len(self.running)
        st["cache_hit_rate"] = self.store.stats.hit_rate if self.store is not None else None
        st["time"] = time.time()
        return st
