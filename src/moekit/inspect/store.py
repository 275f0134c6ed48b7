"""Where a trace's tensors live: in memory, or as safetensors chunk files on disk (bounded memory while tracing;
one key of every chunk is read back at a time)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.errors import MoekitError
from moekit.files import clean_stale, new_temp_dir, swap_in

META = "trace.json"



class TraceStoreError(MoekitError, ValueError):
    """A trace directory that cannot be written or read."""


class MemoryStore:
    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}

    def add(self, chunk: dict[str, Tensor]) -> None:
        for key, t in chunk.items():
            self._parts.setdefault(key, []).append(t)

    def has(self, key: str) -> bool:
        return key in self._parts

    def get(self, key: str) -> Tensor:
        parts = self._parts[key]
        if len(parts) > 1:
            self._parts[key] = parts = [torch.cat(parts)]
        return parts[0]

    def finish(self, meta: dict) -> MemoryStore:  # noqa: ARG002 (the disk store writes it)
        return self


class DiskStore:
    """Chunks `chunk-00000.safetensors`, ... and `trace.json` in a directory. Written into a temporary sibling
    directory that replaces `out_dir` only when the trace is complete."""

    def __init__(self, out_dir: str | os.PathLike, write: bool = True) -> None:
        self.dir = Path(out_dir)
        self.chunks: list[str] = []
        self._keys: set[str] = set()
        if write:
            if self.dir.exists() and (not self.dir.is_dir() or
                                      (any(self.dir.iterdir()) and not (self.dir / META).exists())):
                raise TraceStoreError(f"{self.dir}: exists and is not a trace directory; expected a new or empty "
                                      "directory (or an earlier trace to replace)")
            clean_stale(self.dir)
            self.tmp = new_temp_dir(self.dir, "trace")

    def add(self, chunk: dict[str, Tensor]) -> None:
        name = f"chunk-{len(self.chunks):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in chunk.items()}, str(self.tmp / name))
        self.chunks.append(name)
        self._keys.update(chunk)

    def has(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> Tensor:
        parts = []
        for name in self.chunks:
            with safe_open(str(self.dir / name), framework="pt") as f:
                parts.append(f.get_tensor(key))
        return torch.cat(parts)

    def finish(self, meta: dict) -> DiskStore:
        (self.tmp / META).write_text(json.dumps({**meta, "chunks": self.chunks, "keys": sorted(self._keys)}))
        swap_in(self.tmp, self.dir)
        return self

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> tuple[DiskStore, dict]:
        store = cls(directory, write=False)
        path = store.dir / META
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TraceStoreError(f"{path}: cannot read ({err}); expected a trace written by moekit.inspect.trace"
                                  ) from None
        store.chunks = meta.pop("chunks")
        store._keys = set(meta.pop("keys"))
        missing = [c for c in store.chunks if not (store.dir / c).is_file()]
        if missing:
            raise TraceStoreError(f"{store.dir / missing[0]}: missing; expected every chunk trace.json lists")
        return store, meta
