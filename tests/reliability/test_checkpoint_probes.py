"""Issue 14's checkpoint probes (defects 1, 2, 3, 11, 15, 16): corrupted copies of a checkpoint shaped like
moekit-tiny v1 (`probe_checkpoint`), made here at test time. Every one is refused before any model is built, as
one MoekitError line: `moekit info` and `moekit eval` exit 2 with one line on stderr naming the file and field,
`moekit.hf.load` raises a MoekitError, the inputs keep their bytes and nothing is written. Before the fix each of
these loaded, hung, ran out of memory or ended in a traceback (the issue lists what each did)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import moekit.hf as mh
from checkpoints import v1_shaped_checkpoint as probe_checkpoint
from moekit.cli.main import main
from moekit.default import default_model_path
from moekit.errors import MoekitError
from moekit.hf.headers import INDEX, SINGLE
from moekit.hf.manifest import MANIFEST

FILES = ("config.json", "generation_config.json", SINGLE, "tokenizer.json", "tokenizer_config.json")
EXPERT = "model.layers.0.mlp.experts.0.gate_proj.weight"  # BF16 [384, 256]
DOWN = "model.layers.0.mlp.experts.0.down_proj.weight"  # BF16 [256, 384]


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A copy of the probe checkpoint (config, weights, tokenizer) in tmp_path/model; tmp_path is the cwd."""
    model = tmp_path / "model"
    model.mkdir()
    for name in FILES:
        shutil.copyfile(probe_checkpoint() / name, model / name)
    os.chdir(tmp_path)
    return model


@pytest.fixture(autouse=True)
def _restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = read_st(path)
    change(header)
    write_st(path, header, data)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text())
    value = change(value) or value
    path.write_text(json.dumps(value))


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (symbolic links as their target) -> sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def refused(capsys, root: Path, model: Path, pattern: str, verbs: tuple[str, ...] = ("info", "eval")) -> None:
    """Each verb on `model` exits 2 with one line holding `pattern`; moekit.hf.load raises it as a MoekitError; no
    file under `root` (the cwd, the model, anything beside it) changed or appeared."""
    before = tree(root)
    capsys.readouterr()
    for verb in verbs:
        assert main([verb, str(model)]) == 2, verb
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"moekit {verb}: error: "), err
        assert pattern in err, err
    with pytest.raises(MoekitError) as caught:
        mh.load(model)
    assert pattern in str(caught.value) and "\n" not in str(caught.value)
    assert tree(root) == before


# defect 1: config sizes not checked against the weights before the model is built


def test_config_of_defaults_refused_before_building(capsys, tmp_path, tiny, monkeypatch):
    """Only model_type: every size at transformers' default (24 layers, hidden 2048, 128 experts, vocab 151936):
    eval was OOM-killed at 24 GB building it."""
    (tiny / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))

    def build(*_args, **_kwargs):
        raise AssertionError("a model object was built")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", build)
    refused(capsys, tmp_path, tiny, "config.json: num_hidden_layers=24 (not in the file: transformers' default); "
                                    "expected at most 4 (the weights hold 4 decoder layers)")


def test_config_of_defaults_with_the_right_layer_count(capsys, tmp_path, tiny):
    (tiny / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 4}))
    refused(capsys, tmp_path, tiny, "model.embed_tokens.weight is BF16[4096, 256]; config.json (hidden_size=2048, "
                                    "num_experts=128, moe_intermediate_size=768, num_hidden_layers=4) expects "
                                    "[151936, 2048]")


@pytest.mark.parametrize("layers", [1_000_000_000, 5, 0, -1, "4", 4.0, True])
def test_layer_count_checked_on_the_raw_config(capsys, tmp_path, tiny, layers):
    """info grew without end on num_hidden_layers: 1000000000 (families.py ranges over it)."""
    edit_json(tiny / "config.json", lambda c: c.update(num_hidden_layers=layers))
    expected = "expected at most 4" if isinstance(layers, int) and layers > 1 else "expected a positive integer"
    refused(capsys, tmp_path, tiny, f"config.json: num_hidden_layers={layers!r}; {expected}", verbs=("info",))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("hidden_size", 512, "expects [4096, 512]"),
    ("num_local_experts", 10**12, "num_experts=1000000000000; expected at most 11,"),  # its config.json key
    ("vocab_size", 4000, "expects [4000, 256]"),
])
def test_sizes_against_the_weights(capsys, tmp_path, tiny, key, value, expected):
    edit_json(tiny / "config.json", lambda c: c.update({key: value}))
    refused(capsys, tmp_path, tiny, expected, verbs=("info",))


# defect 2: header validation gaps


def test_metadata_must_be_strings(capsys, tmp_path, tiny):
    edit_header(tiny / SINGLE, lambda h: h.update(__metadata__=["format", "pt"]))
    refused(capsys, tmp_path, tiny, "model.safetensors: corrupt safetensors header: __metadata__ is [\"format\", "
                                    "\"pt\"]; expected an object of strings")


def test_overlapping_offsets(capsys, tmp_path, tiny):
    def overlap(h):  # expert 1's gate_proj reads expert 0's bytes
        h[EXPERT.replace(".0.gate", ".1.gate")]["data_offsets"] = h[EXPERT]["data_offsets"]

    edit_header(tiny / SINGLE, overlap)
    refused(capsys, tmp_path, tiny, "overlaps")


def test_trailing_data(capsys, tmp_path, tiny):
    with (tiny / SINGLE).open("ab") as f:
        f.write(b"\0" * 16)
    refused(capsys, tmp_path, tiny, "model.safetensors: corrupt: 16 trailing bytes after the last tensor")


def test_duplicate_header_key(capsys, tmp_path, tiny):
    header, data = read_st(tiny / SINGLE)
    text = json.dumps(header)
    entry = json.dumps({EXPERT: header[EXPERT]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    (tiny / SINGLE).write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    refused(capsys, tmp_path, tiny, f"key '{EXPERT}' appears twice")


def _index(model: Path, **fields) -> None:
    header, _ = read_st(model / SINGLE)
    weight_map = {name: SINGLE for name in header if name != "__metadata__"}
    (model / INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map, **fields}))


def test_index_without_metadata(capsys, tmp_path, tiny):
    _index(tiny)
    edit_json(tiny / INDEX, lambda index: index.pop("metadata") and None)
    refused(capsys, tmp_path, tiny, "index.json: corrupt index: expected a JSON object with a 'metadata' object")


def test_index_with_an_integer_in_weight_map(capsys, tmp_path, tiny):
    _index(tiny)
    edit_json(tiny / INDEX, lambda index: index["weight_map"].update({EXPERT: 3}))
    refused(capsys, tmp_path, tiny, f"index.json: corrupt index: weight_map['{EXPERT}'] is 3; expected a shard file")


def test_swapped_shapes_of_equal_size(capsys, tmp_path, tiny):
    """gate_proj [384, 256] and down_proj [256, 384] swap shapes: both headers stay consistent with the bytes."""
    def swap(h):
        h[EXPERT]["shape"], h[DOWN]["shape"] = h[DOWN]["shape"], h[EXPERT]["shape"]

    edit_header(tiny / SINGLE, swap)
    refused(capsys, tmp_path, tiny, f"model.safetensors: {DOWN} is BF16[384, 256]; config.json (")


@pytest.mark.parametrize("k", [9, 0, -1, 2.5, None])
def test_k_outside_one_to_experts(capsys, tmp_path, tiny, k):
    """k = 9 > 8 experts ended in `selected index k out of range`; k = 0 (defect 3) gave eval perplexity 1434."""
    edit_json(tiny / "config.json", lambda c: c.update(num_experts_per_tok=k))
    expected = f"config.json: num_experts_per_tok={k!r}; expected an integer in 1..8 (the experts of layer 0)"
    if k in (2.5, None):  # transformers' own validator
        expected = "config.json: cannot be read as a transformers config: Validation error for field 'num_experts_per"
    refused(capsys, tmp_path, tiny, expected)


@pytest.fixture(scope="module")
def manifest_checkpoint(tmp_path_factory) -> Path:
    """The probe checkpoint with layer 3 cut to 6 experts: a moekit manifest checkpoint."""
    model = mh.load(probe_checkpoint())
    block = mh.view(model)[3]
    family = mh.family_of(model.config)
    from moekit.hf.manifest import resize_block

    resize_block(block.block, 6, block.experts.intermediate_size, model.config.hidden_size, family.router,
                 family.experts, family.transposed, family.bias)
    with torch.no_grad():
        for p in block.block.parameters():
            p.normal_(0.0, 0.02)
    return mh.save(model, tmp_path_factory.mktemp("manifest") / "model")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: m["layers"]["3"].update(num_experts=-3), "moekit.json: layers['3']: num_experts=-3, "
                                                        "intermediate_size=384; expected a layer index >= 0"),
    (lambda m: m["layers"]["3"].update(num_experts=7), "experts.down_proj is BF16[6, 256, 384]; moekit.json with "
                                                       "config.json ("),
    (lambda m: m["layers"].update({"9": {"num_experts": 6, "intermediate_size": 384}}),
     "moekit.json: layer 9 is not an MoE layer of config.json"),
])
def test_manifest_sizes(capsys, tmp_path, manifest_checkpoint, change, expected):
    model = shutil.copytree(manifest_checkpoint, tmp_path / "model")
    os.chdir(tmp_path)
    edit_json(model / MANIFEST, change)
    refused(capsys, tmp_path, model, expected)


def test_manifest_k_above_its_experts(capsys, tmp_path, manifest_checkpoint):
    model = shutil.copytree(manifest_checkpoint, tmp_path / "model")
    os.chdir(tmp_path)
    edit_json(model / "config.json", lambda c: c.update(num_experts_per_tok=7))
    refused(capsys, tmp_path, model, "num_experts_per_tok=7; expected an integer in 1..6 (the experts of layer 3)")


def test_manifest_checkpoint_loads(manifest_checkpoint):
    assert [b.num_experts for b in mh.view(mh.load(manifest_checkpoint))] == [8, 8, 8, 6]


# defect 3: wrong weights loaded silently


@pytest.mark.parametrize("dtype", ["I16", "F16", "U16"])
def test_expert_tensor_relabelled(capsys, tmp_path, tiny, dtype):
    """Same byte size, other dtype: eval reported perplexity 532 (I16) or 1434 instead of 173."""
    edit_header(tiny / SINGLE, lambda h: h[EXPERT].update(dtype=dtype))
    expected = ("is F16 but 95 other routed-expert tensors are BF16; expected one dtype for all of them"
                if dtype == "F16" else f"is {dtype}; config.json (")
    refused(capsys, tmp_path, tiny, f"model.safetensors: {EXPERT} {expected}")


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"])
def test_other_tensor_relabelled_f16(capsys, tmp_path, tiny, name):
    """The same tensor in the other layers is BF16: a relabelled one is refused."""
    edit_header(tiny / SINGLE, lambda h: h[name].update(dtype="F16"))
    kind = name.replace(".1.", ".N.").replace(".2.", ".N.")
    refused(capsys, tmp_path, tiny, f"model.safetensors: {name} is F16 but 3 other tensors {kind} are BF16; "
                                    f"expected one dtype for all of them", verbs=("info",))


def test_norm_relabelled_as_integer(capsys, tmp_path, tiny):
    edit_header(tiny / SINGLE, lambda h: h["model.norm.weight"].update(dtype="I16"))
    refused(capsys, tmp_path, tiny, "model.norm.weight is I16; config.json (")


# defect 11: shards outside the checkpoint directory


def _outside_shard(tmp_path: Path) -> Path:
    """A whole, valid copy of the weights beside the checkpoint: what an escaping index would have read."""
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(probe_checkpoint() / SINGLE, outside)
    return outside


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_shard_outside(capsys, tmp_path, tiny, name):
    outside = _outside_shard(tmp_path)
    name = str(outside) if name == "ABSOLUTE" else name
    _index(tiny)
    edit_json(tiny / INDEX, lambda index: index.update(weight_map=dict.fromkeys(index["weight_map"], name)))
    (tiny / SINGLE).unlink()
    refused(capsys, tmp_path, tiny, f"index.json: weight_map names shard '{name}'; expected a file name inside")


def test_index_shard_symlink_escape(capsys, tmp_path, tiny):
    outside = _outside_shard(tmp_path)
    _index(tiny)
    edit_json(tiny / INDEX, lambda index: index.update(weight_map=dict.fromkeys(index["weight_map"], "link.st")))
    (tiny / SINGLE).unlink()
    (tiny / "link.st").symlink_to(outside)
    refused(capsys, tmp_path, tiny, "index.json: weight_map shard 'link.st': resolves to")


def test_single_file_symlink_escape(capsys, tmp_path, tiny):
    outside = _outside_shard(tmp_path)
    (tiny / SINGLE).unlink()
    (tiny / SINGLE).symlink_to(outside)
    refused(capsys, tmp_path, tiny, "model.safetensors: resolves to")


def test_hugging_face_cache_layout_loads(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>, outside the snapshot."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, name in enumerate(FILES):
        shutil.copyfile(probe_checkpoint() / name, blobs / f"blob{i}")
        (snapshot / name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert mh.load(snapshot).config.model_type == "qwen3_moe"


# defect 16: inspect without tokenizer files


def test_inspect_without_tokenizer_names_the_files(capsys, tmp_path, tiny):
    """It traced the model with an empty tokenizer and said 'docs: no window of at least 2 tokens'."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny / name).unlink()
    data = tmp_path / "data.txt"
    data.write_text("Some text to trace. " * 50)
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tiny), "--data", str(data), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model: no tokenizer files; expected tokenizer.json (or tokenizer.model" in err
    assert tree(tmp_path) == before


# defect 15: an auto_map naming modules the output does not hold


def test_save_drops_auto_map_without_its_modules(capsys, tmp_path, tiny):
    """The source names its own modeling code; moekit loads and saves the family's classes and copies no code, so
    the output must not name modules it does not hold (transformers then failed with trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    (tiny / "modeling_custom.py").write_text("raise RuntimeError('checkpoint code was run')\n")
    edit_json(tiny / "config.json", lambda c: c.update(auto_map={
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM", "AutoConfig": "modeling_custom.CustomConfig"}))
    before = tree(tiny)
    out = mh.save(mh.load(tiny), tmp_path / "out")
    assert tree(tiny) == before
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map entries AutoConfig, AutoModelForCausalLM dropped" in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).config.model_type == "qwen3_moe"


def test_manifest_keeps_its_own_modeling_file(manifest_checkpoint, capsys):
    config = json.loads((manifest_checkpoint / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_moekit.MoekitForCausalLM"}
    assert "auto_map" not in capsys.readouterr().err


@pytest.mark.slow
def test_compress_output_loads_with_trust_remote_code(tmp_path, tiny):
    """`moekit compress` end to end on a source with a foreign auto_map: a native output (skip thresholds only)."""
    from transformers import AutoModelForCausalLM

    edit_json(tiny / "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_custom.X"}))
    data = str(default_model_path() / "test_split.jsonl")
    assert main(["compress", str(tiny), "--skip", "0.1", "--data", data, "--eval-data", data, "--cal-tokens",
                 "256", "--eval-tokens", "256", "--out", str(tmp_path / "out")]) == 0
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)


@pytest.mark.parametrize("damage", ["config_only", "corrupt"])
def test_eval_tokenizer_files(capsys, tmp_path, tiny, damage):
    """tokenizer_config.json without a vocabulary ended eval in transformers' ValueError traceback (it tried to
    convert a slow tokenizer); a corrupt tokenizer.json likewise."""
    if damage == "config_only":
        (tiny / "tokenizer.json").unlink()
        expected = "model: no tokenizer files; expected tokenizer.json"
    else:
        (tiny / "tokenizer.json").write_text("{broken")
        expected = "model: the tokenizer files cannot be read (Expecting property name"
    data = tmp_path / "data.txt"
    data.write_text("Some text to score. " * 20)
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(tiny), "--data", str(data)]) == 2
    err = capsys.readouterr().err  # after transformers' "Loading weights" progress bar: the model loaded
    assert "Traceback" not in err and err.endswith("\n") and expected in err.splitlines()[-1], err
    assert tree(tmp_path) == before


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory) -> Path:
    from hf.tiny import tiny_model  # tests/ is on sys.path (tests/conftest.py)

    return mh.save(tiny_model("deepseek_v3"), tmp_path_factory.mktemp("dsv3") / "model")


@pytest.mark.parametrize(("change", "expected"), [
    ({"n_group": 6}, "n_group=6; expected groups of at least 2 experts (n_routed_experts=6)"),
    ({"n_group": 4}, "n_group=4; expected a positive divisor of n_routed_experts=6"),
    ({"topk_group": 5}, "topk_group=5; expected an integer in 1..3 (n_group)"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok=5; expected at most 4 (topk_group=2 groups of 2 experts)"),
])
def test_group_routing_that_cannot_pick_k(capsys, tmp_path, deepseek_v3, change, expected):
    """DeepSeek-V3 routes within n_group groups, topk_group of them: sizes that cannot pick k experts."""
    model = shutil.copytree(deepseek_v3, tmp_path / "model")
    os.chdir(tmp_path)
    edit_json(model / "config.json", lambda c: c.update(change))
    refused(capsys, tmp_path, model, f"config.json: {expected}", verbs=("info",))
