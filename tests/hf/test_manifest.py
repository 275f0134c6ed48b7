"""Models whose layers no longer fit their config: saved with a moekit manifest and a modeling file, loaded by
moekit.hf.load and by plain transformers with trust_remote_code=True."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_model
from transformers import AutoModelForCausalLM

import moekit.hf as mh
from moekit.hf.headers import CheckpointError
from moekit.hf.info import describe
from moekit.hf.manifest import MANIFEST, MODELING, layer_shapes, resize_block

IDS = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def shrunk(model_type: str, experts: int = 3, width_delta: int = -4):
    """A tiny model whose last MoE layer has `experts` experts of a different width, with random weights."""
    model = tiny_model(model_type)
    family = mh.family_of(model.config)
    block = mh.view(model)[-1]
    resize_block(block.block, experts, block.experts.intermediate_size + width_delta, 40, family.router,
                 family.experts, family.transposed, family.bias)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in block.block.named_parameters():
            if "shared" not in name:
                p.normal_(0.0, 0.5 if name.startswith(family.router) else 0.2)
        for name, b in block.block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def _experts(model_type: str) -> int:
    """DeepSeek-V3 ranks groups by their two best experts: E / n_group (n_group = 3) must stay >= 2."""
    return 6 if model_type == "deepseek_v3" else 3


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_manifest_round_trip(model_type, tmp_path):
    model = shrunk(model_type, _experts(model_type))
    last = mh.view(model)[-1].layer
    assert layer_shapes(model) == {last: (_experts(model_type), mh.view(model)[-1].experts.intermediate_size)}
    expected = _logits(model)
    out = mh.save(model, tmp_path / "out")
    assert (out / MANIFEST).exists() and (out / MODELING).exists()
    loaded = mh.load(out, attn_implementation="eager")
    assert torch.equal(_logits(loaded), expected)
    assert [v.num_experts for v in mh.view(loaded)] == [v.num_experts for v in mh.view(model)]
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(plain).__name__ == "MoekitForCausalLM"
    assert plain.config._experts_implementation == model.config._experts_implementation
    # same weights, buffers and config; the loader's tensor layout can change GEMM rounding (seen: 1e-7, PhiMoE)
    torch.testing.assert_close(_logits(plain), expected, atol=1e-6, rtol=0)
    info = describe(out)
    assert info["experts_per_layer"][str(last)] == _experts(model_type)
    assert info["layout"] == "moekit-manifest"


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_resized_model_accelerates(model_type):
    """resize_block keeps the module attributes transformers' experts read (num_experts) consistent."""
    model = shrunk(model_type, _experts(model_type))
    expected = _logits(model)
    mh.accelerate(model)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


def test_manifest_sharded_and_bf16(tmp_path):
    model = shrunk("qwen2_moe").to(torch.bfloat16)
    out = mh.save(model, tmp_path / "out", max_shard_size="30KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    loaded = mh.load(out)
    assert loaded.dtype == torch.bfloat16
    expected = model.state_dict()  # logits would differ: `.to(bf16)` also casts RoPE's inv_freq, loading does not
    assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())


def test_manifest_errors(tmp_path):
    out = mh.save(shrunk("mixtral"), tmp_path / "out")
    bad = shutil.copytree(out, tmp_path / "bad")
    (bad / MANIFEST).write_text("[]")
    with pytest.raises(CheckpointError, match="moekit.json: corrupt manifest"):
        mh.load(bad)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["layers"]["1"]["num_experts"] = 4
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.1.*is F32\[3, .*moekit.json with "
                                              r"config.json \(.*\) expects \[4, "):
        mh.load(bad)
