"""The expert store: experts read on demand from a checkpoint's safetensors files by byte range, into a cache with
a byte budget, with prefetch I/O on background threads.

Nothing reads a whole file: `safetensors_layout` reads each file's header (8 bytes of length, then the JSON), and
every expert is a list of `Part`s, each one tensor of one expert given as byte ranges of a file (one range for a
per-expert tensor or a slice of a fused [E, ...] tensor, one per row for a column block of a packed matrix).
`PreadReader` reads them with `os.pread`. The cache holds at most `budget_bytes // largest expert` experts
(slots), prefetched ones included from the moment their read starts, so the bytes it holds never exceed the budget.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError
from moekit.runtime.policies import CacheFull, Policy

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20

Key = tuple[int, int]


class StoreError(MoekitError, ValueError):
    """An expert could not be read from its checkpoint file (missing, truncated, unreadable)."""


@dataclass(frozen=True)
class TensorLoc:
    """Where a tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def safetensors_layout(path: Path, reader: PreadReader) -> dict[str, TensorLoc]:
    """The tensors of one safetensors file with absolute byte offsets, from its header only."""
    size = os.path.getsize(path)
    head = reader.read(path, 0, 8)
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise StoreError(f"{path}: safetensors header of {n} bytes in a {size}-byte file; expected a valid file")
    try:
        header = json.loads(bytes(reader.read(path, 8, n)))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: corrupt safetensors header ({err}); expected JSON") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        if dtype not in DTYPES:
            raise StoreError(f"{path}: tensor {name} has dtype {dtype}; expected one of {', '.join(DTYPES)}")
        if end - begin != math.prod(shape) * torch.empty(0, dtype=DTYPES[dtype]).element_size():
            raise StoreError(f"{path}: tensor {name}: data_offsets {begin}..{end} do not fit shape {list(shape)}")
        out[name] = TensorLoc(path, dtype, shape, 8 + n + begin, 8 + n + end)
    return out


class PreadReader:
    """Reads byte ranges of files with `os.pread` (one descriptor per file, shared by threads); counts what it read.
    A range past the end of the file is a StoreError naming the file (a checkpoint truncated after loading).
    Each descriptor is opened with `POSIX_FADV_RANDOM`: every read is an exact expert range, and the kernel's
    readahead (up to read_ahead_kb, often megabytes) would only read neighbouring experts into the page cache,
    disk bandwidth and memory (under a cgroup cap, charged) that no token asked for."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as err:
                    raise StoreError(f"{path}: cannot open ({err.strerror}); expected the checkpoint's file") from None
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

    def read(self, path: Path, offset: int, length: int, out: memoryview | None = None) -> bytearray | memoryview:
        """`length` bytes at `offset`, into `out` when given (a writable buffer of `length` bytes)."""
        fd = self._fd(Path(path))
        out = bytearray(length) if out is None else out
        view = memoryview(out).cast("B")
        done = 0
        while done < length:
            try:
                chunk = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                raise StoreError(f"{path}: read of bytes {offset}..{offset + length} failed ({err.strerror})") from None
            if chunk == 0:
                raise StoreError(f"{path}: ends at byte {offset + done}, expected bytes up to {offset + length} "
                                 "(truncated after loading?)")
            done += chunk
        with self._lock:
            self.bytes_read += length
            self.reads += 1
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass(frozen=True)
class Part:
    """One tensor of one expert: `shape` and `dtype`, made of `ranges` (file, offset, length) read in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    ranges: tuple[tuple[Path, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(r[2] for r in self.ranges)

    def read(self, reader: PreadReader, out: Tensor | None = None) -> Tensor:
        """The tensor, its ranges read one after another into `out` (uint8 [nbytes]; allocated here if None)."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8) if out is None else out
        view, pos = memoryview(buf.numpy()), 0
        for path, off, n in self.ranges:
            reader.read(path, off, n, view[pos:pos + n])
            pos += n
        return buf.view(self.dtype).reshape(self.shape)


def slice_part(loc: TensorLoc, e: int) -> Part:
    """Expert e of a fused [E, ...] tensor (contiguous)."""
    per = loc.nbytes // loc.shape[0]
    return Part(DTYPES[loc.dtype], loc.shape[1:], ((loc.file, loc.start + e * per, per),))


def whole_part(loc: TensorLoc) -> Part:
    return Part(DTYPES[loc.dtype], loc.shape, ((loc.file, loc.start, loc.nbytes),))


def rows_part(loc: TensorLoc, begin: int, end: int) -> Part:
    """Rows [begin, end) of a 2D tensor (contiguous)."""
    row = loc.nbytes // loc.shape[0]
    return Part(DTYPES[loc.dtype], (end - begin, *loc.shape[1:]), ((loc.file, loc.start + begin * row,
                                                                   (end - begin) * row),))


def columns_part(loc: TensorLoc, begin: int, end: int) -> Part:
    """Columns [begin, end) of a 2D tensor: one range per row."""
    item = loc.nbytes // math.prod(loc.shape)
    rows, cols = loc.shape
    ranges = tuple((loc.file, loc.start + (r * cols + begin) * item, (end - begin) * item) for r in range(rows))
    return Part(DTYPES[loc.dtype], (rows, end - begin), ranges)


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    bytes_read: int = 0
    peak_cached_bytes: int = 0
    per_layer: dict = field(default_factory=dict)  # layer -> [hits, accesses]

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_RANGE = (128 << 10, 32 << 20)  # glibc's default and its 64-bit maximum


def fixed_mmap_threshold(part_bytes: int) -> int | None:
    """Fix glibc's mmap threshold at `part_bytes` (clamped to `MMAP_THRESHOLD_RANGE`) so that expert buffers are
    mmapped and go back to the system when evicted. glibc raises its threshold each time a mmapped block is freed
    (up to 32 MiB); after the first eviction, experts of a few MB come from the heap, whose freed holes stay
    resident, and a cache that holds its byte budget exceeds it in RSS (an OOM kill under a cgroup cap). Setting
    the threshold once turns the adjustment off. Returns the threshold set, None off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or part_bytes <= 0:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    threshold = min(max(part_bytes, MMAP_THRESHOLD_RANGE[0]), MMAP_THRESHOLD_RANGE[1])
    return threshold if mallopt(M_MMAP_THRESHOLD, threshold) == 1 else None


class ExpertStore:
    """Experts `(layer, e) -> {name: Part}` cached under `budget_bytes` by `policy` (its capacity in slots of the
    largest expert). `get` returns an expert's tensors (reading it on a miss, or waiting for its prefetch);
    `prefetch` starts background reads; `begin_layer` tells the store which experts a layer's real gate chose, so
    prefetches it did not choose are evicted first. An error in a prefetch thread is raised in the caller at the
    next `get`, `prefetch` or `begin_layer`."""

    def __init__(self, experts: dict[Key, dict[str, Part]], budget_bytes: int, policy: Policy,
                 reader: PreadReader | None = None, workers: int = 2, dtype: torch.dtype | None = None):
        self.experts = experts
        self.reader = reader or PreadReader()
        self.dtype = dtype  # float matrices are cast to it as they are read (codes and scales keep theirs)
        self.slot_bytes = max(self.expert_bytes(parts) for parts in experts.values())
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.cache: dict[Key, dict[str, Tensor] | Future] = {}
        self.speculative: set[Key] = set()
        self.stats = StoreStats()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="moekit-prefetch") if workers else None
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._ahead: set[Key] = set()
        smallest = min((p.nbytes for parts in experts.values() for p in parts.values()), default=0)
        fixed_mmap_threshold(smallest)

    def _cast(self, name: str, part: Part) -> bool:
        return self.dtype not in (None, part.dtype) and name in ("gate_up", "down") and part.dtype.is_floating_point

    def expert_bytes(self, parts: dict[str, Part]) -> int:
        """An expert's bytes in memory (in the compute dtype where cast)."""
        size = torch.empty(0, dtype=self.dtype).element_size() if self.dtype is not None else 0
        return sum(math.prod(p.shape) * size if self._cast(n, p) else p.nbytes for n, p in parts.items())

    @staticmethod
    def slots_for(budget_bytes: int, slot_bytes: int) -> int:
        if budget_bytes < slot_bytes:
            raise ConfigError(f"expert memory {budget_bytes} bytes is smaller than one expert ({slot_bytes} bytes); "
                              "expected at least one expert's bytes")
        return budget_bytes // slot_bytes

    def cached_bytes(self) -> int:
        return sum(sum(p.nbytes for p in self.experts[k].values()) for k in self.cache)

    def _raise_errors(self) -> None:
        with self._lock:
            if self._errors:
                err = self._errors.pop(0)
                raise err

    def _alloc(self, key: Key) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Expert `key`'s buffers per part: (raw bytes, the cast tensor or None). Allocated by the thread that asks
        for the expert, never by a prefetch thread: glibc gives each thread its own malloc arena, and buffers
        allocated in the prefetch threads' arenas but freed at eviction stay in those arenas, resident memory
        beyond the budget (measured: +130 MB over a 150 MB budget with next-layer prefetch)."""
        parts = self.experts.get(key)
        if parts is None:
            raise StoreError(f"expert {key[1]} of layer {key[0]}: not in the checkpoint")
        return {name: (torch.empty(part.nbytes, dtype=torch.uint8),
                       torch.empty(part.shape, dtype=self.dtype) if self._cast(name, part) else None)
                for name, part in parts.items()}

    def _read(self, key: Key, buffers: dict[str, tuple[Tensor, Tensor | None]] | None = None) -> dict[str, Tensor]:
        buffers = self._alloc(key) if buffers is None else buffers
        parts = self.experts[key]
        out = {}
        with torch.inference_mode():  # the buffers may be inference tensors (allocated under the caller's mode)
            for name, part in parts.items():
                raw, cast = buffers[name]
                t = part.read(self.reader, raw)
                out[name] = t if cast is None else cast.copy_(t)
        with self._lock:
            self.stats.bytes_read += sum(p.nbytes for p in parts.values())
        return out

    def _evict(self, keys: Iterable[Key]) -> None:
        for k in keys:
            entry = self.cache.pop(k, None)
            if isinstance(entry, Future):
                entry.cancel()  # a prefetch not started yet is not read at all
            self.speculative.discard(k)

    def _admit(self, key: Key, protect: set[Key]) -> bool:
        try:
            evicted = self.policy.insert(key, protect=protect)
        except CacheFull:
            return False
        self._evict(evicted)
        return True

    def _track_peak(self) -> None:
        self.stats.peak_cached_bytes = max(self.stats.peak_cached_bytes, len(self.cache) * self.slot_bytes)

    def prefetch(self, keys: Iterable[Key], protect: Iterable[Key] = ()) -> None:
        """Start reading `keys` in the background (those not cached and in the checkpoint), as long as they fit
        without evicting `protect` or each other."""
        self._raise_errors()
        keep = set(protect) | set(keys) | self._ahead
        for key in keys:
            if key in self.cache or key not in self.experts:
                continue
            if not self._admit(key, keep):
                break
            if self._pool is None:
                self.cache[key] = self._read(key)
            else:
                fut = self._pool.submit(self._read, key, self._alloc(key))
                fut.add_done_callback(self._on_done)
                self.cache[key] = fut
            self.speculative.add(key)
            self.stats.prefetched += 1
            self._track_peak()

    def _on_done(self, fut: Future) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            with self._lock:
                self._errors.append(err)

    def begin_layer(self, layer: int, chosen: Iterable[int]) -> None:
        """The real gate of `layer` chose `chosen`: its other prefetched experts are demoted (evicted first)."""
        self._raise_errors()
        chosen = set(chosen)
        self._ahead = {(layer, e) for e in chosen}
        for key in [k for k in self.speculative if k[0] == layer and k[1] not in chosen]:
            self.policy.demote(key)
            self.speculative.discard(key)

    def get(self, layer: int, e: int) -> dict[str, Tensor]:
        """Expert e of `layer`, from the cache or read now (the access is recorded with the policy)."""
        key = (layer, e)
        self._ahead.discard(key)
        hit = self.policy.access(key) and key in self.cache
        counts = self.stats.per_layer.setdefault(layer, [0, 0])
        counts[1] += 1
        if hit:
            self.stats.hits += 1
            counts[0] += 1
            entry = self.cache[key]
            if key in self.speculative:
                self.speculative.discard(key)
                self.stats.prefetch_used += 1
            if isinstance(entry, Future):
                try:
                    entry = entry.result()
                except BaseException:
                    self._evict([key])
                    self.policy.evict(key)
                    with self._lock:
                        self._errors.clear()
                    raise
                self.cache[key] = entry
            self._raise_errors()
            return entry
        self._raise_errors()
        self.stats.misses += 1
        admitted = self._admit(key, self._ahead)  # evict first: the cache never holds more than its slots
        try:
            tensors = self._read(key)
        except BaseException:
            self.policy.evict(key)
            raise
        if admitted:
            self.cache[key] = tensors
            self._track_peak()
        else:  # every slot holds an expert this layer still needs: this one streams through
            self.policy.evict(key)
        return tensors

    def warm(self, keys: list[Key]) -> None:
        """Read the first `keys` that fit into the cache now, the best (first) last, so that recency-based policies
        keep it longest (a warm start: TAER)."""
        for key in reversed(keys[: self.policy.capacity]):
            if key in self.cache or key not in self.experts:
                continue
            if not self._admit(key, set()):
                break
            self.cache[key] = self._read(key)
        self._track_peak()

    def drain(self) -> None:
        """Wait for every prefetch in flight; raise the first error any of them met."""
        wait([f for f in self.cache.values() if isinstance(f, Future)])
        for key, entry in list(self.cache.items()):
            if isinstance(entry, Future) and entry.exception() is not None:
                self._evict([key])
                self.policy.evict(key)
        self._raise_errors()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
