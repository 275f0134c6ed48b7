"""Property: a safetensors header corrupted at random (bytes flipped in its JSON, fields changed, offsets shifted,
dtypes swapped, shapes permuted, the header length changed) gives `moekit.hf.load` either a model or a
MoekitError, never any other exception; and whatever loads has every tensor the untouched checkpoint has, with
the same values (no corruption loads as other weights)."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import moekit.hf as mh
from hf.tiny import tiny_model  # tests/ is on sys.path (tests/conftest.py)
from moekit.errors import MoekitError
from moekit.hf.headers import DTYPE_BYTES, SINGLE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Qwen3-MoE saved in bf16 (one file) and its state dict as loaded."""
    path = mh.save(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path_factory.mktemp("prop") / "model")
    return path, mh.load(path).state_dict()


def _split(raw: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


@st.composite
def corruptions(draw, raw: bytes) -> bytes:
    n, text, data = _split(raw)
    header = json.loads(text)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["flip", "field", "offsets", "dtype", "shape", "length", "metadata", "drop"]))
    if kind == "flip":  # bytes of the JSON changed in place
        text = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            text[draw(st.integers(0, len(text) - 1))] = draw(st.integers(0, 255))
        return struct.pack("<Q", n) + bytes(text) + data
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 64), n + 64))) + text + data
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "field":
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(
            st.none() | st.integers(-2, 2**40) | st.text(max_size=4) | st.lists(st.integers(-1, 500), max_size=3))
    elif kind == "offsets":
        shift = draw(st.integers(-4096, 4096).filter(bool))
        which = draw(st.sampled_from([0, 1, None]))
        entry["data_offsets"] = [o + shift if which in (None, i) else o for i, o in enumerate(entry["data_offsets"])]
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from([d for d in DTYPE_BYTES if d != entry["dtype"]]))
    elif kind == "shape":
        shape = entry["shape"]
        permuted = draw(st.permutations(shape))
        if permuted == shape:  # a 1-D or square tensor: swap shapes with another tensor of the same size instead
            other = header[draw(st.sampled_from(names))]
            entry["shape"], other["shape"] = other["shape"], shape
        else:
            entry["shape"] = permuted
    elif kind == "metadata":
        header["__metadata__"] = draw(st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2)
                                      | st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3)))
    else:
        del header[name]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_corrupt_header_loads_or_is_one_moekit_error(checkpoint, data):
    path, reference = checkpoint
    raw = (path / SINGLE).read_bytes()
    corrupt = data.draw(corruptions(raw))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(path, Path(tmp) / "model"))
        (copy / SINGLE).write_bytes(corrupt)
        try:
            model = mh.load(copy)
        except MoekitError as err:
            assert "\n" not in str(err)
            return
        assert isinstance(model, nn.Module)
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), "a corrupt header loaded other weights"
