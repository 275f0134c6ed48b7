"""`moekit make distill MODEL --teacher DENSE`: the made MoE's blocks distilled from the dense FFNs (m2mKD), the
block error measured here independently of the verb's own report; JSON, atomic output, refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from make_families import TEXT, dense_model, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import moekit.hf as mh
import moekit.make as mk
from moekit.cli.main import main


def digest(directory) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill_cli")
    src = tmp / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("qwen3", vocab=vocab, ffn_std=0.1).save_pretrained(src)
    data = tmp / "cal.txt"
    data.write_text(TEXT * 20)
    moe = tmp / "moe"
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--method", "random", "--router", "emoe",
                 "--out", str(moe)]) == 0
    return src, moe, data, vocab


def block_mse(student, teacher, windows) -> list[float]:
    """Each MoE block's MSE to the teacher's FFN on the teacher's own FFN inputs (computed here, not by the verb)."""
    blocks = mh.view(student)
    inputs = mk.capture_inputs(teacher, windows, [b.layer for b in blocks])
    out = []
    with torch.no_grad():
        for b in blocks:
            x = inputs[b.layer]
            y = b.block(x.unsqueeze(0))
            y = y[0] if isinstance(y, tuple) else y
            out.append(float(torch.nn.functional.mse_loss(y.squeeze(0), mk.ffn(teacher, b.layer)(x))))
    return out


def test_distill_verb_lowers_the_block_error(made, tmp_path, capsys):
    src, moe, data, _ = made
    before = digest(moe), digest(src)
    out = tmp_path / "distilled"
    capsys.readouterr()
    assert main(["make", "distill", str(moe), "--teacher", str(src), "--steps", "120", "--data", str(data),
                 "--seq-len", "32", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (digest(moe), digest(src)) == before  # inputs untouched
    assert [r["layer"] for r in summary["layers"]] == [0, 1] and summary["steps"] == 120
    assert all(r["mse_after"] < 0.7 * r["mse_before"] for r in summary["layers"])
    assert json.loads((out / "distill.json").read_text()) == summary
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*"))  # no temporary left beside it
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    old = AutoModelForCausalLM.from_pretrained(moe, experts_implementation="eager").eval()
    new = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    # the saved blocks are the distilled ones: on the calibration text's tokens (what the verb fitted; on random
    # tokens, far from 40 words of text, a tiny text does not carry over) their error is well below the input's
    ids = AutoTokenizer.from_pretrained(out)(TEXT * 2, return_tensors="pt").input_ids[0]
    windows = list(ids.split(32))
    for a, b in zip(block_mse(new, teacher, windows), block_mse(old, teacher, windows), strict=True):
        assert a < 0.7 * b
    attn = {n: p for n, p in old.named_parameters() if "self_attn" in n or "embed" in n}
    assert all(torch.equal(p, attn[n]) for n, p in new.named_parameters() if n in attn)


def test_distill_verb_refusals(made, tmp_path, capsys):
    src, moe, data, _ = made
    other = tmp_path / "other"
    save_tiny_tokenizer(other)
    dense_model("qwen3", vocab=120, layers=3).save_pretrained(other)
    out = tmp_path / "x"
    cases = [([], "--teacher missing"),
             (["--teacher", str(moe)], "already an MoE"),
             (["--teacher", str(other)], "num_hidden_layers=3"),
             (["--teacher", str(src), "--steps", "0"], "--steps=0"),
             (["--teacher", str(src), "--minutes", "1"], "--minutes"),
             (["--teacher", str(src), "--out", str(moe / "sub")], "input")]
    for model, extra, message in [(moe, *c) for c in cases] + [(src, ["--teacher", str(src)], "a dense qwen3")]:
        capsys.readouterr()
        args = ["make", "distill", str(model), "--data", str(data), *extra]
        if "--out" not in extra:
            args += ["--out", str(out)]
        assert main(args) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not out.exists() and not (moe / "sub").exists()
