"""Checkpoint files without loading weights: which safetensors files a directory holds and what their headers say.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets}}, plus an optional "__metadata__"), then the tensor data. Every check here reads only headers and
file sizes, so a truncated or corrupt file, or a missing shard, is reported before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass, replace
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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open_regular(path: Path):
    """`path` opened for reading, refused unless it is a regular file (a FIFO would block, a device never end)."""
    try:
        st = path.stat()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err}); expected a safetensors file") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file; expected a safetensors file")
    return st.st_size, path.open("rb")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's size: a JSON object of tensors (each a known
    dtype, a shape of non-negative integers and data offsets holding exactly its bytes) and an optional
    `__metadata__` of strings, whose tensors tile the data that follows the header exactly (no gap, overlap or
    trailing byte)."""
    size, f = _open_regular(path)
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, expected at least an 8-byte safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated: header length {n} but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: expected JSON ({err})") from None
    except CheckpointError as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: {err}; expected unique keys") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is {json.dumps(metadata)[:80]}; "
                              f"expected an object of strings")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: corrupt safetensors header: entry {name!r} needs exactly dtype, shape and "
                                  f"data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} dtype {dtype!r}; expected one of "
                                  f"{', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} shape {shape!r}; expected a list of "
                                  f"non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} data_offsets {offsets!r}; expected "
                                  f"[start, end] with 0 <= start <= end")
        start, end = offsets
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - start != expected:
            raise CheckpointError(f"{path}: corrupt: {name} {dtype}{shape} needs {expected} bytes, header "
                                  f"gives offsets [{start}, {end})")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: {name} ends at byte {end} of the data, the file holds "
                                  f"{data_size} data bytes")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path.name)
        spans.append((start, end, name))
    _check_tiling(path, sorted(spans), data_size)
    return tensors


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges, sorted, cover [0, data_size) exactly once."""
    position, previous = 0, None
    for start, end, name in spans:
        if start < position:
            raise CheckpointError(f"{path}: corrupt: {name} data [{start}, {end}) overlaps {previous}'s; expected "
                                  f"each tensor in its own bytes")
        if start > position:
            raise CheckpointError(f"{path}: corrupt: {start - position} unused data bytes before {name} at "
                                  f"{position}; expected tensors back to back")
        position, previous = end, name
    if position != data_size:
        raise CheckpointError(f"{path}: corrupt: {data_size - position} trailing bytes after the last tensor; "
                              f"expected the data to end at byte {position}")


def _shard_path(directory: Path, index: Path, name: str) -> Path:
    """The shard `name` of `index`, refused unless it is a plain relative path that stays inside `directory`
    (symbolic links too; except the Hugging Face cache layout, where snapshots/<rev>/ files link to ../../blobs)."""
    pure = Path(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise CheckpointError(f"{index}: weight_map names shard {name!r}; expected a file name inside {directory}")
    path = directory / pure
    _inside(path, directory, f"{index}: weight_map shard {name!r}")
    return path


def _inside(path: Path, directory: Path, what: str) -> None:
    real, root = path.resolve(), directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{what}: resolves to {real}, outside the checkpoint directory; expected a file "
                              f"inside {directory}")


def read_index(directory: Path) -> dict[str, str]:
    """The weight_map of `directory`'s index (tensor name -> shard file name), checked: a JSON object with a
    'metadata' object and a 'weight_map' of strings to strings."""
    from moekit.files import MAX_JSON_BYTES, read_bounded

    index = directory / INDEX
    raw = read_bounded(index, MAX_JSON_BYTES, "JSON index", CheckpointError)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
        raise CheckpointError(f"{index}: corrupt index: expected a JSON object with a 'metadata' object and a "
                              f"'weight_map' object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: corrupt index: 'weight_map' is {json.dumps(weight_map)[:80]}; expected "
                              f"an object of tensor names to shard file names")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{index}: corrupt index: weight_map[{bad!r}] is {json.dumps(weight_map[bad])[:60]}; "
                              f"expected a shard file name")
    return weight_map


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or model.safetensors; every one
    inside the directory."""
    index = directory / INDEX
    if index.exists():
        names = sorted(set(read_index(directory).values()))
        paths = [_shard_path(directory, index, name) for name in names]
        missing = [name for name, path in zip(names, paths, strict=True) if not path.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]} which is missing from {directory}"
                                  + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))
        return paths
    if (directory / SINGLE).is_file():
        _inside(directory / SINGLE, directory, str(directory / SINGLE))
        return [directory / SINGLE]
    found = sorted(p.name for p in directory.glob("*.bin"))
    hint = f"; found only {', '.join(found)} (PyTorch pickles are not read)" if found else ""
    raise CheckpointError(f"{directory}: expected {SINGLE} or {INDEX}{hint}")


def read_checkpoint(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from its headers only: each name in one file only, and with an index,
    in the file its weight_map names."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(directory):
        file = path.relative_to(directory).as_posix()
        for name, info in read_header(path).items():
            info = replace(info, file=file)
            if name in tensors:
                raise CheckpointError(f"{path}: holds {name}, which {tensors[name].file} holds too; expected each "
                                      f"tensor in one file")
            tensors[name] = info
    if (directory / INDEX).exists():
        weight_map = read_index(directory)
        for name, info in tensors.items():
            if Path(weight_map.get(name, "")) != Path(info.file):
                raise CheckpointError(f"{directory / INDEX}: weight_map[{name!r}] is {weight_map.get(name)!r}, but "
                                      f"the tensor is in {info.file}; expected the file that holds it")
        extra = sorted(set(weight_map) - set(tensors))
        if extra:
            raise CheckpointError(f"{directory / INDEX}: weight_map names {extra[0]}, which {weight_map[extra[0]]} "
                                  f"does not hold; expected only stored tensors")
    return tensors
