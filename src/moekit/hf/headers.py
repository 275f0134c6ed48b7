"""Checkpoint files without loading weights: which safetensors files a directory holds and what their headers say.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets}}, plus an optional "__metadata__"), then the tensor data. Every check here reads only headers and
file sizes, so a truncated or corrupt file, or a missing shard, is reported before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import MoekitError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 2**20


class CheckpointError(MoekitError, ValueError):
    """A checkpoint directory or file is missing, truncated, corrupt, or disagrees with its config."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, expected at least an 8-byte safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated: header length {n} but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: expected JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: entry {name!r} needs dtype, shape and "
                                  f"data_offsets") from None
        if end - start != expected or start < 0:
            raise CheckpointError(f"{path}: corrupt: {name} {dtype}{list(shape)} needs {expected} bytes, header "
                                  f"gives offsets [{start}, {end})")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: {name} ends at byte {end} of the data, the file holds "
                                  f"{data_size} data bytes")
        tensors[name] = TensorInfo(name, dtype, shape, path.name)
    return tensors


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or model.safetensors."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: corrupt index: expected JSON with a 'weight_map' object") from None
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]} which is missing from {directory}"
                                  + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))
        return [directory / name for name in names]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    found = sorted(p.name for p in directory.glob("*.bin"))
    hint = f"; found only {', '.join(found)} (PyTorch pickles are not read)" if found else ""
    raise CheckpointError(f"{directory}: expected {SINGLE} or {INDEX}{hint}")


def read_checkpoint(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from its headers only."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(directory):
        tensors.update(read_header(path))
    return tensors
