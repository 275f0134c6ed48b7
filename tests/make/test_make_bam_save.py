"""Saving BAM: the attention mixture written with moekit's manifest and modeling file, loaded back by plain
transformers (`trust_remote_code=True`) with equal logits, shared K/V kept shared; `moekit make --method bam`."""

from __future__ import annotations

import json

import pytest
import torch
from make_families import TEXT, dense_model, perturbed_branches, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.bam import mix_attention
from moekit.make.bam_save import MANIFEST, load_bam, save_bam
from moekit.make.btx import mix


@pytest.mark.parametrize("model_type, share_kv", [("qwen3", False), ("qwen3", True), ("deepseek_v3", True)])
def test_saved_bam_loads_in_transformers_with_equal_logits(tmp_path, model_type, share_kv):
    model = dense_model(model_type)
    branches = perturbed_branches(model, seed=20)
    moe, plan = mix(branches, k=1, router="random")
    mix_attention(moe, branches, share_kv=share_kv)
    with torch.no_grad():  # a router that is not zero, so each expert's own weights matter
        for layer in moe.model.layers:
            layer.self_attn.router.weight.normal_(0, 0.5)
    out = save_bam(moe, tmp_path / "bam", plan=plan)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "moekit-bam" and manifest["bam"]["experts"] == 2
    assert manifest["bam"]["share_kv"] is share_kv and manifest["plan"]["partition"] == "btx"
    assert "moekit_bam" not in moe.config.to_dict()  # the in-memory config is left as it was
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(back).__name__ == "MoekitBamForCausalLM"
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, moe(ids).logits, atol=1e-6)
    experts = back.model.layers[1].self_attn.experts
    kv = "k_proj" if model_type == "qwen3" else "kv_b_proj"
    assert (experts[0].get_submodule(kv) is experts[1].get_submodule(kv)) is share_kv
    assert not torch.equal(experts[0].o_proj.weight, experts[1].o_proj.weight)
    assert torch.equal(load_bam(out).lm_head.weight, back.lm_head.weight)


def test_refusals(tmp_path):
    model = dense_model("qwen3")
    with pytest.raises(ConfigError, match="not every layer's attention is a mixture"):
        save_bam(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_make_bam(tmp_path, capsys):
    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("qwen3", vocab=vocab).save_pretrained(src)
    code, prose = TEXT.split("\n\n")
    (tmp_path / "code.txt").write_text(code * 20)
    (tmp_path / "prose.txt").write_text(prose * 20)
    data = ["--data", str(tmp_path / "code.txt"), "--data", str(tmp_path / "prose.txt")]
    out = tmp_path / "bam"
    capsys.readouterr()
    assert main(["make", str(src), "--method", "bam", "--share-kv", "--k", "1", *data, "--steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["partition"] == "bam" and summary["share_kv"] is True and summary["domains"] == ["code", "prose"]
    assert (out / "tokenizer.json").is_file() and (out / "plan.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    attn = back.model.layers[0].self_attn
    assert len(attn.experts) == 2 and attn.experts[0].v_proj is attn.experts[1].v_proj
    with torch.no_grad():
        assert torch.isfinite(back(torch.randint(0, vocab, (1, 8))).logits).all()
    capsys.readouterr()
    assert main(["make", str(src), "--method", "btx", "--share-kv", "--k", "1", *data, "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--share-kv" in err[0] and not (tmp_path / "bad").exists()
