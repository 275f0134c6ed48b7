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
    _expect_exit_2(capsys, mismatch, "experts.0.w1.weight is F32[24, 40]; config.json (hidden_size=40, "
                                     "num_local_experts=6, intermediate_size=30, num_hidden_layers=2) expects [30, 40]")

    dense = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", num_experts=0))
    dense.save_pretrained(tmp_path / "dense")
    _expect_exit_2(capsys, tmp_path / "dense", "num_experts=0 gives a dense Qwen2-MoE model with no MoE layer")
    with pytest.raises(MoekitError, match="dense Qwen2-MoE"):
        mh.load(tmp_path / "dense")

    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50))
    llama.save_pretrained(tmp_path / "llama")
    _expect_exit_2(capsys, tmp_path / "llama", "model_type='llama' is not a supported MoE family")


def _fake_checkpoint(path, config, tensors):
    """A checkpoint holding only `tensors` (what `describe` reads: headers), with `config` as config.json."""
    from safetensors.torch import save_file

    path.mkdir()
    config.save_pretrained(path)
    save_file(tensors, path / "model.safetensors")
    return path


def test_mxfp4_gpt_oss_counts_logical_params(tmp_path):
    """GPT-OSS ships MXFP4 experts: uint8 `*_blocks` [E, out, in / 32, 16] (two 4-bit values a byte) and
    `*_scales` [E, out, in / 32]; they hold 2 parameters a byte and none respectively."""
    e, h, i = 4, 64, 32
    config = tiny_config("gpt_oss", hidden_size=h, intermediate_size=i, num_local_experts=e,
                         quantization_config={"quant_method": "mxfp4"})
    u8, bf16 = torch.uint8, torch.bfloat16
    tensors = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        tensors |= {p + "router.weight": torch.zeros(e, h, dtype=bf16), p + "router.bias": torch.zeros(e, dtype=bf16),
                    p + "experts.gate_up_proj_blocks": torch.zeros(e, 2 * i, h // 32, 16, dtype=u8),
                    p + "experts.gate_up_proj_scales": torch.zeros(e, 2 * i, h // 32, dtype=u8),
                    p + "experts.gate_up_proj_bias": torch.zeros(e, 2 * i, dtype=bf16),
                    p + "experts.down_proj_blocks": torch.zeros(e, h, i // 32, 16, dtype=u8),
                    p + "experts.down_proj_scales": torch.zeros(e, h, i // 32, dtype=u8),
                    p + "experts.down_proj_bias": torch.zeros(e, h, dtype=bf16)}
    info = describe(_fake_checkpoint(tmp_path / "gpt-oss", config, tensors))
    per_expert = 3 * h * i + 2 * i + h
    assert info["quantization"] == "mxfp4" and info["experts_per_layer"] == {"0": e, "1": e}
    assert info["total_params"] == 2 * (e * h + e + e * per_expert)
    assert info["active_params"] == info["total_params"] - 2 * (e - 2) * per_expert
    expert_bytes = (e * 2 * i * h // 2 + e * 2 * i * h // 32 + e * 2 * i * 2) + (e * h * i // 2 + e * h * i // 32
                                                                                + e * h * 2)
    assert info["layers"][0]["bytes_per_expert"] == expert_bytes // e


def test_fp8_deepseek_scales_are_not_params(tmp_path):
    config = tiny_config("deepseek_v3", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    f8, i, h = torch.float8_e4m3fn, 20, 40
    tensors = {}
    for layer in (1, 2):
        for j in range(6):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                name = f"model.layers.{layer}.mlp.experts.{j}.{proj}."
                tensors[name + "weight"] = torch.zeros(shape, dtype=f8)
                tensors[name + "weight_scale_inv"] = torch.zeros(1, 1)
    info = describe(_fake_checkpoint(tmp_path / "dsv3", config, tensors))
    assert info["quantization"] == "fp8" and info["moe_layers"] == [1, 2]
    assert info["total_params"] == 2 * 6 * 3 * h * i
    assert info["layers"][1]["bytes_per_expert"] == 3 * h * i + 3 * 4


def test_cli_without_model_describes_the_default(capsys):
    from moekit.default import default_model_path

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == describe(default_model_path())
