"""Implementations chosen by measurement, per machine.

Where moekit has several ways to compute the same thing (dispatch's `loop` / `grouped_mm` / `threads`, a small-row
product as x W^T or (W x^T)^T, a quantized expert through a packed int8/int4 kernel or by dequantizing it), the
fastest depends on the CPU, the thread count, the dtype and the shape. `Tuner.choose(kind, shape, candidates)` times
the candidates once for a shape class (interleaved rounds, medians), keeps the winner and reuses it: in memory, and on
disk in one JSON file per machine under the user's cache directory (`$MOEKIT_CACHE_DIR`, else
`$XDG_CACHE_HOME/moekit`, else `~/.cache/moekit`), named and keyed by the CPU model, the torch version and the thread
count. A cache file that is corrupt or written for another machine key is ignored with one warning (and replaced on
the next save), never trusted.

`MOEKIT_TUNE=0` turns tuning off: every caller then uses its documented default (dispatch: `default_impl`), as the
test suite does (tests/conftest.py). Nothing is measured inside the thread pool's workers (their timings would race
each other) or while tuning is `suspended`; there the cached choice applies, else the default.
All candidates compute the same function (tests hold each against tests/reference.py), so the choice changes the
time, not the result beyond float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import torch

ENV = "MOEKIT_TUNE"
FORMAT = "moekit-tune"
VERSION = 1
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

Measure = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


class TuneCacheWarning(UserWarning):
    """A tune cache file was ignored (corrupt, or written for another CPU, torch version or thread count)."""


def enabled() -> bool:
    """Whether tuning is on (`MOEKIT_TUNE` unset or anything but 0). Off, every choice is its documented default
    and the cache is neither read nor written."""
    return os.environ.get(ENV, "1").strip() != "0"


def _may_measure() -> bool:
    return enabled() and not getattr(_local, "suspended", False)


_local = threading.local()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Measure nothing in this thread inside the block (cached choices still apply)."""
    before = getattr(_local, "suspended", False)
    _local.suspended = True
    try:
        yield
    finally:
        _local.suspended = before


def suspend_in_this_thread() -> None:
    """For worker threads: measure nothing in this thread from now on."""
    _local.suspended = True


@cache
def cpu_info() -> dict:
    """The CPU's model name, the SIMD/matrix flags that matter to torch's CPU kernels that it has, and the ISA level
    torch dispatches to (`torch.backends.cpu.get_cpu_capability()`)."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if flags and name:
                break
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return {"cpu": name, "cpu_flags": [f for f in _FLAGS if f in flags], "cpu_capability": capability}


def machine_key(threads: int | None = None) -> dict:
    """What a cached choice is valid for: CPU model, torch version, thread count."""
    return {"cpu": cpu_info()["cpu"], "torch": torch.__version__,
            "threads": torch.get_num_threads() if threads is None else threads}


def cache_dir() -> Path:
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit"


def bucket(n: int) -> int:
    """n rounded up to a power of two (0 and 1 give 1): shapes in one bucket share a choice."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _time_once(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) * 1e3 / inner


def measure_ms(fns: dict[str, Callable[[], object]], budget_ms: float = 60.0, seed: int = 0) -> dict[str, float]:
    """Median milliseconds per call of each function: one warm-up call each, then interleaved rounds in a fresh
    random order (3 to 15 rounds within about `budget_ms`), a call repeated within a sample when it is very short."""
    with torch.no_grad():
        first = {name: _time_once(fn, 1) for name, fn in fns.items()}  # also the warm-up
        fastest = max(min(first.values()), 1e-4)
        inner = max(1, min(64, int(0.2 / fastest)))
        per_round = sum(first.values()) * inner
        rounds = max(3, min(15, int(budget_ms / max(per_round, 1e-3))))
        rng = random.Random(seed)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                samples[name].append(_time_once(fns[name], inner))
    return {name: statistics.median(s) for name, s in samples.items()}


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Tuner:
    """Choices by shape class, measured with `measure` (injectable: tests pass fake timings) and kept under
    `directory` (None: `cache_dir()`; `persist=False`: in memory only)."""

    def __init__(self, directory: Path | str | None = None, measure: Measure = measure_ms, persist: bool = True):
        self.directory = None if directory is None else Path(directory)
        self.measure, self.persist = measure, persist
        self._tables: dict[int, dict[str, dict]] = {}
        self._lock = threading.RLock()

    def path(self, threads: int | None = None) -> Path:
        key = machine_key(threads)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return (self.directory or cache_dir()) / f"tune-{digest}.json"

    def _load(self, threads: int) -> dict[str, dict]:
        path = self.path(threads)
        if not self.persist or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            choices = data["choices"]
            ok = (data.get("format") == FORMAT and data.get("version") == VERSION
                  and data.get("machine") == machine_key(threads) and isinstance(choices, dict)
                  and all(isinstance(r, dict) and isinstance(r.get("impl"), str) for r in choices.values()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            ok, data = False, None
        if not ok:
            why = "corrupt" if data is None else "written for another machine key or format"
            warnings.warn(f"{path}: tune cache {why}; expected {FORMAT} version {VERSION} for {machine_key(threads)}"
                          f"; ignored (choices are measured again)", TuneCacheWarning, stacklevel=3)
            return {}
        return dict(choices)

    def table(self, threads: int | None = None) -> dict[str, dict]:
        """{shape key: {"impl": winner, "ms": {candidate: median ms}}} for `threads` (default: the current count)."""
        threads = torch.get_num_threads() if threads is None else threads
        with self._lock:
            if threads not in self._tables:
                self._tables[threads] = self._load(threads)
            return self._tables[threads]

    def _save(self, threads: int) -> None:
        if not self.persist:
            return
        path = self.path(threads)
        data = {"format": FORMAT, "version": VERSION, "machine": machine_key(threads),
                "choices": self._tables[threads]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".json")
            os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would have made it
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:
            warnings.warn(f"{path}: tune cache not written ({err}); choices kept in memory", TuneCacheWarning,
                          stacklevel=3)
            self.persist = False

    def cached(self, kind: str, shape: tuple) -> str | None:
        """The cached winner for this shape class, or None."""
        record = self.table().get(shape_key(kind, shape))
        return None if record is None else record["impl"]

    def choose(self, kind: str, shape: tuple, candidates: dict[str, Callable[[], object]],
               default: str | None = None) -> str:
        """The fastest candidate for `kind` at `shape` (a tuple of plain values naming the shape class): cached, or
        measured now when tuning is enabled, else `default` (the first candidate if None)."""
        names = list(candidates)
        if len(names) == 1:
            return names[0]
        fallback = default if default in candidates else names[0]
        if not enabled():
            return fallback
        threads = torch.get_num_threads()
        key = shape_key(kind, shape)
        record = self.table(threads).get(key)
        if record is not None and record["impl"] in candidates:
            return record["impl"]
        if not _may_measure():
            return fallback
        ms = self.measure(candidates)  # not under the lock: candidates run on worker threads that read the cache
        best = min(names, key=lambda n: ms[n])
        with self._lock:
            self._tables[threads][key] = {"impl": best, "ms": {n: round(float(ms[n]), 5) for n in names}}
            self._save(threads)
        return best


def shape_key(kind: str, shape: tuple) -> str:
    """The cache key of a shape class: kind and the shape values, joined by |."""
    return "|".join((kind, *(str(v).replace("torch.", "") for v in shape)))


_tuner: Tuner | None = None
_memo: dict[tuple, str] = {}


def tuner() -> Tuner:
    """The process-wide tuner (its cache under `cache_dir()`)."""
    global _tuner
    if _tuner is None:
        _tuner = Tuner()
    return _tuner


def set_tuner(new: Tuner | None) -> Tuner | None:
    """Replace the process-wide tuner (None: a fresh default one on next use); returns the old one. Forgets the
    choices memoised from the old one."""
    global _tuner
    old, _tuner = _tuner, new
    _memo.clear()
    return old


SMALL_ROWS = range(2, 9)  # the row counts where x W^T and (W x^T)^T differ in speed enough to choose


def choose(kind: str, shape: tuple, candidates: Callable[[], dict[str, Callable[[], object]]], default: str) -> str:
    """`tuner().choose` for hot loops: `default` when tuning is off; else the choice, memoised per process once it is
    in the cache (so a hit costs one dict lookup); `candidates()` is built only when something must be measured."""
    if not enabled():
        return default
    key = (kind, shape, torch.get_num_threads())
    hit = _memo.get(key)
    if hit is not None:
        return hit
    t = tuner()
    name = t.cached(kind, shape)
    if name is None:
        name = t.choose(kind, shape, candidates(), default)
        if t.cached(kind, shape) is None:  # not measured (suspended thread): don't fix the default
            return name
    _memo[key] = name
    return name


def small_linear_transposed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """For x [n, in] with n in SMALL_ROWS: whether (W x^T)^T beats x W^T here. CPU BLAS may run x W^T with so few
    rows as one matrix-vector product per row, reading W once per row, while W x^T reads it once. Default without
    measurement: n <= 3 (measured on an AMD EPYC Zen 4: 2-2.5x faster there; other CPUs differ)."""
    shape = (x.shape[0], weight.shape[0], weight.shape[1], x.dtype, "contiguous" if weight.is_contiguous() else "t")

    def candidates() -> dict[str, Callable[[], object]]:
        w, xd = weight.detach(), x.detach()
        return {"x_wt": lambda: torch.mm(xd, w.t()), "w_xt": lambda: torch.mm(w, xd.t())}

    return choose("linear", shape, candidates, "w_xt" if x.shape[0] <= 3 else "x_wt") == "w_xt"
