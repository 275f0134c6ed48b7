import copy
import os
import warnings

import pytest
import torch

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.errors import ConfigError, UnknownNameError
from moekit.hf.headers import CheckpointError
from moekit.runtime.offload import load_offloaded, parse_memory
from moekit.runtime.policies import LRU
from moekit.runtime.store import ExpertStore, Part, PreadReader, StoreError

IDS = torch.tensor([[5, 7, 9, 11, 13, 17]])


class CountingReader(PreadReader):
    def __init__(self):
        super().__init__()
        self.ranges = []

    def read(self, path, offset, length, out=None):
        self.ranges.append((os.path.basename(path), offset, length))
        return super().read(path, offset, length, out)


def saved(model, tmp_path, name="m"):
    path = tmp_path / name
    mh.save(model, path)
    return path


def resident_tokens(path):
    ref = mh.load(path)
    mh.accelerate(ref, "loop")
    with torch.no_grad():
        return ref.generate(IDS, max_new_tokens=6, do_sample=False), ref(IDS).logits


def check_equal(path, budget="30%", policy="lru"):
    tokens, logits = resident_tokens(path)
    off = load_offloaded(path, budget, policy)
    try:
        assert off.store is not None
        with torch.no_grad():
            assert torch.equal(off.model.generate(IDS, max_new_tokens=6, do_sample=False), tokens)
            torch.testing.assert_close(off.model(IDS).logits, logits, rtol=0, atol=0)
        assert off.store.stats.misses > 0 and off.store.stats.peak_cached_bytes <= off.store.budget_bytes
    finally:
        off.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "granitemoe", "gpt_oss", "deepseek_v2", "phimoe"])
def test_tokens_equal_the_resident_model(family, tmp_path):
    check_equal(saved(tiny_model(family), tmp_path))


@pytest.mark.parametrize("policy", ["lfu", "lfuda", "moe-infinity", "layer-lru"])
def test_every_policy_is_lossless(policy, tmp_path):
    check_equal(saved(tiny_model("olmoe"), tmp_path), "25%", policy)


def _calibrated(model):
    g = torch.Generator().manual_seed(1)
    windows = [(torch.randint(3, 97, (16,), generator=g), None) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return mc.calibrate(model, windows, grads=True, progress=False)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ragged_and_quantized_checkpoints(family, tmp_path):
    model = tiny_model(family)
    ragged = mc.apply(copy.deepcopy(model), mc.plan(model, _calibrated(model), "heapr", 0.3))
    check_equal(saved(ragged, tmp_path, "ragged"))
    quant = apply_quant(copy.deepcopy(model), plan_quant(model, None, "int8"))
    check_equal(saved(quant, tmp_path, "quant"))
    both = apply_quant(copy.deepcopy(ragged), plan_quant(ragged, None, "int4"))
    check_equal(saved(both, tmp_path, "both"))


def test_store_reads_exactly_the_expert_bytes(tmp_path):
    model = tiny_model("qwen3_moe")
    path = saved(model, tmp_path)
    reader = CountingReader()
    off = load_offloaded(path, "50%", reader=reader, workers=0)
    reader.ranges.clear()
    parts = off.store.get(1, 4)
    # qwen3 keeps gate_proj, up_proj and down_proj of expert 4 as three tensors: three ranges, 3 x 20 x 40 floats
    assert len(reader.ranges) == 3 and sum(n for *_, n in reader.ranges) == 3 * 20 * 40 * 4
    want = mh.view(model)[1].experts
    assert torch.equal(parts["gate_up"], want.gate_up_proj[4]) and torch.equal(parts["down"], want.down_proj[4])
    reader.ranges.clear()
    off.store.get(1, 4)  # cached: nothing read
    assert reader.ranges == []
    assert off.store.stats.bytes_read == 3 * 20 * 40 * 4
    off.close()


def test_budget_is_never_exceeded(tmp_path):
    path = saved(tiny_model("mixtral"), tmp_path)
    off = load_offloaded(path, 2 * 11520 + 100)  # two expert slots
    store = off.store
    seen = []
    get = store.get

    def probe(layer, e):  # the bytes of every tensor the cache holds, after each access
        out = get(layer, e)
        seen.append(sum(t.numel() * t.element_size() for v in store.cache.values() if isinstance(v, dict)
                        for t in v.values()))
        return out

    store.get = probe
    with torch.no_grad():
        off.model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert seen and max(seen) <= store.budget_bytes and max(seen) == 2 * 11520
    off.close()


def test_budget_errors_and_resident_fallback(tmp_path):
    path = saved(tiny_model("qwen3_moe"), tmp_path)
    with pytest.raises(ConfigError, match="smaller than one expert"):
        load_offloaded(path, 1000)
    off = load_offloaded(path, "100%")
    assert off.store is None and "fully resident" in off.note
    with pytest.raises(UnknownNameError, match="unknown cache policy 'mru'"):
        load_offloaded(path, "50%", "mru")
    with pytest.raises(ConfigError, match="trace replay"):
        load_offloaded(path, "50%", "belady")
    assert parse_memory("25%", 400) == 100 and parse_memory("2KiB", 1) == 2048 and parse_memory("1.5GB", 1) == 1.5e9
    with pytest.raises(ConfigError, match="expert memory"):
        parse_memory("lots", 1)


def test_truncated_and_missing_experts(tmp_path):
    path = saved(tiny_model("qwen3_moe"), tmp_path)
    off = load_offloaded(path, "20%")
    (file,) = path.glob("*.safetensors")
    os.truncate(file, os.path.getsize(file) // 2)  # truncated mid-run
    with pytest.raises(StoreError, match="truncated"), torch.no_grad():
        off.model.generate(IDS, max_new_tokens=4, do_sample=False)
    off.close()
    from safetensors.torch import load_file, save_file

    good = saved(tiny_model("qwen3_moe"), tmp_path, "again")
    (file,) = good.glob("*.safetensors")
    state = {k: v for k, v in load_file(file).items() if "layers.1.mlp.experts.3." not in k}
    save_file(state, file, metadata={"format": "pt"})
    # the loader's checkpoint check refuses it before any work, naming the missing tensor
    with pytest.raises(CheckpointError, match=r"needs model\.layers\.1\.mlp\.experts\.3\..* missing from the weights"):
        load_offloaded(good, "20%")


class FailingReader(PreadReader):
    def __init__(self, fail_offset):
        super().__init__()
        self.fail_offset = fail_offset

    def read(self, path, offset, length, out=None):
        if offset == self.fail_offset:
            raise StoreError(f"{path}: read of bytes {offset}..{offset + length} failed (injected)")
        return super().read(path, offset, length, out)


def test_a_failing_prefetch_surfaces_in_the_caller(tmp_path):
    path = saved(tiny_model("qwen3_moe"), tmp_path)
    probe = load_offloaded(path, "50%", workers=0)
    bad = probe.store.experts[(0, 2)]["gate_up"].ranges[0][1]
    probe.close()
    store = ExpertStore(probe.store.experts, 4 * 9600, LRU(4), FailingReader(bad), workers=2)
    store.prefetch([(0, 1), (0, 2)])
    with pytest.raises(StoreError, match="injected"):
        store.get(0, 2)  # waits for the failed read and raises it
    store.get(0, 1)  # the other prefetch is fine
    store.prefetch([(0, 2)])  # never asked for: the error comes at the next call once the read ended
    with pytest.raises(StoreError, match="injected"):
        store.drain()
    assert (0, 2) not in store.cache and (0, 2) not in store.policy
    store.close()


def test_part_reads_rows_and_columns(tmp_path):
    from safetensors.torch import save_file

    from moekit.runtime.store import columns_part, rows_part, safetensors_layout, slice_part

    x = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    save_file({"a": x, "b": x.reshape(3, 2, 10).clone()}, tmp_path / "t.safetensors")
    reader = PreadReader()
    layout = safetensors_layout(tmp_path / "t.safetensors", reader)
    assert torch.equal(rows_part(layout["a"], 2, 4).read(reader), x[2:4])
    assert torch.equal(columns_part(layout["a"], 3, 7).read(reader), x[:, 3:7])
    assert torch.equal(slice_part(layout["b"], 1).read(reader), x.reshape(3, 2, 10)[1])
    assert isinstance(rows_part(layout["a"], 0, 1), Part)
    reader.close()
