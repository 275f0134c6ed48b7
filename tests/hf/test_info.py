"""`moekit info`: layout, parameter counts and bytes from config + safetensors headers, and exit 2 on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import moekit.hf as mh
from moekit.cli.main import main
from moekit.errors import MoekitError
from moekit.hf.info import describe


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    models = {t: tiny_model(t) for t in FAMILY_TYPES}
    return {t: (mh.save(m, root / t, max_shard_size="60KB"), m) for t, m in models.items()}


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_describe_matches_the_loaded_model(checkpoints, model_type):
    path, model = checkpoints[model_type]
    info = describe(path)
    views = mh.view(model)
    assert info["model_type"] == model_type
    assert info["moe_layers"] == [v.layer for v in views]
    assert info["dense_layers"] == [i for i in range(model.config.num_hidden_layers) if i not in info["moe_layers"]]
    assert info["experts_per_layer"] == {str(v.layer): v.num_experts for v in views}
    assert info["k"] == views[0].k
    assert info["dtype"] == "F32" and info["layout"] == "native"
    total = sum(t.numel() for t in model.state_dict().values())
    inactive = sum(v.experts.bytes_per_expert() // 4 * (v.num_experts - v.k) for v in views)
    assert info["total_params"] == total
    assert info["active_params"] == total - inactive
    for record, v in zip([r for r in info["layers"] if r["kind"] == "moe"], views, strict=True):
        assert record["bytes_per_expert"] == v.experts.bytes_per_expert()
        layer_sd = {n: t for n, t in model.state_dict().items() if f"layers.{v.layer}." in n}
        assert record["bytes"] == sum(t.numel() * t.element_size() for t in layer_sd.values())
    assert (info["shared_experts"] is not None) == (views[0].shared is not None)


def test_describe_reads_no_weights(checkpoints, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert describe(checkpoints["deepseek_v2"][0])["dense_layers"] == [0]


def test_cli_json_and_table(checkpoints, capsys):
    path = checkpoints["qwen2_moe"][0]
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "Qwen2-MoE" and info["shared_experts"] == {"width": 28, "gate": True}
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Qwen2-MoE" in out and "k=2" in out and "active per token" in out


def _expect_exit_2(capsys, path, pattern):
    capsys.readouterr()  # drop what setting up printed (progress bars)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moekit info: error: ")
    assert pattern in err, err


def test_cli_bad_inputs_exit_2(checkpoints, tmp_path, capsys):
    _expect_exit_2(capsys, tmp_path / "nothing", "expected a checkpoint directory")
    src = checkpoints["mixtral"][0]

    truncated = shutil.copytree(src, tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    _expect_exit_2(capsys, truncated, f"{shard.name}: truncated")

    missing = shutil.copytree(src, tmp_path / "missing")
    sorted(missing.glob("*.safetensors"))[0].unlink()
    _expect_exit_2(capsys, missing, "which is missing")

    mismatch = shutil.copytree(src, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] = 30
    (mismatch / "config.json").write_text(json.dumps(config))
    _expect_exit_2(capsys, mismatch, "config.json: layer 0 experts hold")

    dense = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", num_experts=0))
    dense.save_pretrained(tmp_path / "dense")
    _expect_exit_2(capsys, tmp_path / "dense", "num_experts=0 gives a dense Qwen2-MoE model with no MoE layer")
    with pytest.raises(MoekitError, match="dense Qwen2-MoE"):
        mh.load(tmp_path / "dense")

    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50))
    llama.save_pretrained(tmp_path / "llama")
    _expect_exit_2(capsys, tmp_path / "llama", "model_type='llama' is not a supported MoE family")
