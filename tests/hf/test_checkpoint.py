"""load / save: native round trips for every family, plain transformers loads what moekit saves, and every bad
input is one MoekitError naming the file and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import moekit.hf as mh
from moekit.errors import MoekitError
from moekit.hf.headers import CheckpointError, read_checkpoint

IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny Qwen2-MoE, sharded into several files, and its logits."""
    model = tiny_model("qwen2_moe")
    out = mh.save(model, tmp_path_factory.mktemp("ckpt") / "qwen", max_shard_size="40KB")
    return out, _logits(model)


def _copy(saved, tmp_path):
    import shutil
    return shutil.copytree(saved[0], tmp_path / "copy")


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_round_trip_native(model_type, tmp_path):
    model = tiny_model(model_type)
    out = mh.save(model, tmp_path / "out")
    loaded = mh.load(out, attn_implementation="eager")
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())
    assert torch.equal(_logits(loaded), _logits(model))
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert torch.equal(_logits(plain), _logits(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_accelerated_model_saves_and_loads(tmp_path):
    model = mh.accelerate(tiny_model("mixtral"))
    loaded = mh.load(mh.save(model, tmp_path / "out"), attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)


def test_sharded_round_trip(saved):
    out, logits = saved
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    assert torch.equal(_logits(mh.load(out, attn_implementation="eager")), logits)


def test_bf16_keeps_its_dtype(tmp_path):
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    loaded = mh.load(mh.save(model, tmp_path / "out"))
    assert loaded.dtype == torch.bfloat16
    assert {t.dtype for t in read_checkpoint(tmp_path / "out").values()} == {"BF16"}


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no/such/dir: expected a checkpoint directory"):
        mh.load("/no/such/dir")


def test_missing_shard_named(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    shard = sorted(copy.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"index.json: names shard {shard.name} which is missing"):
        mh.load(copy)


def test_truncated_shard(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        mh.load(copy)


@pytest.mark.parametrize("damage", ["header_length", "header_json", "empty"])
def test_corrupt_shard(saved, tmp_path, damage):
    copy = _copy(saved, tmp_path)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "header_length":
        data[:8] = (2**40).to_bytes(8, "little")
    elif damage == "header_json":
        data[8:12] = b"\xff\xfe{["
    else:
        data = bytearray(b"abc")
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: (corrupt|truncated)"):
        mh.load(copy)


def test_config_disagreeing_with_weights(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["moe_intermediate_size"] = 24
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model-.*safetensors: model.layers.0.mlp.experts.0.down_proj.weight is "
                                              r"F32\[40, 20\]; config.json \(.*moe_intermediate_size=24.*\) expects "
                                              r"\[40, 24\]"):
        mh.load(copy)


def test_config_with_more_layers_than_weights(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: num_hidden_layers=3; expected at most 2 \(the weights "
                                              r"hold 2 decoder layers\)"):
        mh.load(copy)


def test_bad_config_files(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * 3  # 2 layers: transformers' validator refuses it
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: cannot be read as a transformers config: .*layer_types"):
        mh.load(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot be read"):
        mh.load(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        mh.load(copy)


def test_dense_and_unknown_models_refused(tmp_path):
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(MoekitError, match="model_type='llama' is not a supported MoE family; expected one of: "
                                          "Mixtral"):
        mh.load(tmp_path / "llama")
    with pytest.raises(MoekitError, match="not a supported MoE family"):
        mh.save(llama, tmp_path / "out")


def test_save_refuses_its_input_and_non_empty_dirs(saved, tmp_path):
    out, _ = saved
    model = mh.load(out)
    with pytest.raises(CheckpointError, match="is the directory the model was loaded from"):
        mh.save(model, out, force=True)
    with pytest.raises(CheckpointError, match="is the directory the model was loaded from"):
        mh.save(model, out.parent, force=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="busy: not empty"):
        mh.save(model, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    mh.save(model, busy, force=True)
    assert not (busy / "keep.txt").exists() and (busy / "config.json").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    mh.save(model, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        mh.save(model, tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_quantized_experts_refused(tmp_path):
    model = tiny_model("mixtral")
    experts = mh.view(model)[1].experts.module
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.to(torch.int8), requires_grad=False)
    with pytest.raises(CheckpointError, match="layer 1: experts stored as torch.int8; expected floating-point"):
        mh.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    from pathlib import Path

    model = tiny_model("olmoe")
    out = mh.save(model, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.saving-"):
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        mh.save(model, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hub_ids_only_when_online(monkeypatch):
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_model("olmoe")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(CheckpointError, match="org/model: expected a checkpoint directory .*HF_HUB_OFFLINE is set"):
        mh.load("org/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert mh.family_of(mh.load("org/model").config).model_type == "olmoe"
    assert calls == [("org/model", {"dtype": "auto"})]
