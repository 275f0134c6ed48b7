"""MoTE upcycling of a dense checkpoint (`moekit.make.mote`, `moekit make --method mote`): the FFN is the shared
expert, the routed experts are ternary; with zero-initialised routed down projections the model is the dense one;
with the paper's copies each block adds the ternary FFN; the checkpoint loads in transformers and moekit, and
`make finetune` trains it straight-through, keeping the experts ternary and the FFN fixed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from make_families import TEXT, dense_model, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

import moekit.hf as mh
from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.mote import LATENT, MANIFEST, mote_upcycle

GROUP = 8


def _assert_ternary(w: torch.Tensor, group: int) -> None:
    """Every group of `group` consecutive inputs of a row holds values in {-a, 0, a} for one a >= 0."""
    rows = w.detach().reshape(-1, w.shape[-1])
    grouped = rows.view(rows.shape[0], -1, group)
    a = grouped.abs().amax(-1, keepdim=True)
    assert torch.all((grouped == 0) | (grouped.abs() == a))


def test_zero_init_is_the_dense_model_and_the_experts_are_ternary():
    dense = dense_model("deepseek_v3")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    moe, plan, latent = mote_upcycle(dense, experts=4, k=1, init="zero", group_size=GROUP)
    with torch.no_grad():
        assert torch.equal(moe(input_ids=ids).logits, dense(input_ids=ids).logits)
    assert plan["partition"] == "mote" and moe.config.n_routed_experts == 4 and moe.config.num_experts_per_tok == 1
    for block in mh.view(moe):
        mlp = dense.model.layers[block.layer].mlp
        assert torch.equal(block.shared.down_proj.weight, mlp.down_proj.weight)  # the FFN, full precision
        _assert_ternary(block.experts.module.gate_up_proj, GROUP)
        assert not torch.equal(block.experts.module.gate_up_proj, latent[block.layer]["gate_up_proj"])
        assert torch.equal(latent[block.layer]["gate_up_proj"][2],
                           torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))


def test_copy_init_adds_the_ternary_ffn_to_the_dense_output():
    """The paper's init: y = FFN(x) + T(FFN)(x) (the chosen weights sum to routed_scaling_factor, the copies' down
    projections are divided by it)."""
    dense = dense_model("deepseek_v3")
    moe, _, _ = mote_upcycle(dense, experts=4, k=2, init="copy", group_size=GROUP)
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    r = moe.config.routed_scaling_factor
    for block in mh.view(moe):
        w = block.experts.module
        gate, up = w.gate_up_proj[0].chunk(2)
        _assert_ternary(w.down_proj, GROUP)
        ternary_ffn = (F.silu(x @ gate.T) * (x @ up.T)) @ w.down_proj[0].T * r
        with torch.no_grad():
            out = block.block(x)
            expected = dense.model.layers[block.layer].mlp(x) + ternary_ffn
        assert torch.allclose(out, expected, atol=1e-5)
        assert (out - dense.model.layers[block.layer].mlp(x)).abs().max() > 1e-2


def test_bad_settings():
    dense = dense_model("deepseek_v3")
    for kw, message in ((dict(init="half"), "--mote-init='half'"), (dict(group_size=6), "--group-size=6"),
                        (dict(k=5), "--k=5"), (dict(experts=0), "--experts=0")):
        with pytest.raises(ConfigError, match=message):
            mote_upcycle(dense, **({"experts": 4} | kw))
    with pytest.raises(ConfigError, match="without a shared expert"):
        mote_upcycle(dense_model("qwen3"), experts=4)


def test_cli_make_mote_loads_and_finetunes_straight_through(tmp_path, capsys):
    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense = dense_model("deepseek_v3", vocab=vocab)
    dense.save_pretrained(src)
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 20)
    made, tuned = tmp_path / "mote", tmp_path / "tuned"
    assert main(["make", str(src), "--method", "mote", "--experts", "4", "--mote-init", "zero",
                 "--group-size", str(GROUP), "--out", str(made), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["partition"] == "mote" and summary["k"] == 1 and (made / MANIFEST).is_file()
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(2))
    plain = AutoModelForCausalLM.from_pretrained(made).eval()  # no remote code
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(mh.load(made)(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)

    assert main(["make", "finetune", str(made), "--steps", "3", "--lr", "1e-2", "--batch-size", "2",
                 "--seq-len", "32", "--data", str(data), "--out", str(tuned)]) == 0
    after = AutoModelForCausalLM.from_pretrained(tuned).eval()
    assert (tuned / MANIFEST).is_file() and (tuned / LATENT).is_file()
    for old, new in zip(mh.view(plain), mh.view(after), strict=True):
        assert torch.equal(old.shared.up_proj.weight, new.shared.up_proj.weight)  # the FFN stays frozen
        assert not torch.equal(old.router.weight, new.router.weight)
        down = new.experts.module.down_proj
        assert down.abs().max() > 0  # the routed contribution grew from zero
        _assert_ternary(down.transpose(1, 2) if new.experts.transposed else down, GROUP)
    assert torch.equal(plain.model.embed_tokens.weight, after.model.embed_tokens.weight)
    with torch.no_grad():
        assert not torch.allclose(after(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4)

    capsys.readouterr()
    assert main(["make", str(src), "--method", "mote", "--experts", "4", "--group-size", "6",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size=6" in err[0] and not (tmp_path / "bad").exists()
