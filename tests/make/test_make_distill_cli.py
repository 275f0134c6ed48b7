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


def test_teachers_verb_distils_specialists_self_paced(tmp_path, capsys):
    """`make distill STUDENT --teachers A B --data a.txt --data b.txt`: the student's KL to each teacher falls on
    the teacher's own domain, the weights follow the progress rule (mean 1), inputs untouched; refusals."""
    import copy

    from moekit.make.btx import mix

    vocab = save_tiny_tokenizer(tmp_path / "student")
    base = dense_model("qwen3", vocab=vocab, ffn_std=0.1)
    teachers = []
    for d in range(2):
        t = copy.deepcopy(base)
        g = torch.Generator().manual_seed(40 + d)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        t.save_pretrained(tmp_path / f"teacher{d}")
        teachers.append(t)
    mix(teachers, k=1, router="random")[0].save_pretrained(tmp_path / "student")
    code, prose = TEXT.split("\n\n")
    (tmp_path / "code.txt").write_text(code * 30)
    (tmp_path / "prose.txt").write_text(prose * 30)
    data = ["--data", str(tmp_path / "code.txt"), "--data", str(tmp_path / "prose.txt")]
    before = digest(tmp_path / "student"), digest(tmp_path / "teacher0")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["make", "distill", str(tmp_path / "student"), "--teachers", str(tmp_path / "teacher0"),
                 str(tmp_path / "teacher1"), *data, "--steps", "12", "--lr", "3e-3", "--batch-size", "2",
                 "--seq-len", "32", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (digest(tmp_path / "student"), digest(tmp_path / "teacher0")) == before
    assert summary["domains"] == ["code", "prose"] and summary["pace"] == "progress" and summary["steps"] == 12
    assert all(b < 0.7 * a for a, b in zip(summary["first_losses"], summary["last_losses"], strict=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = torch.tensor(rows[0]["teacher_losses"])
    for r in rows:
        ratio = torch.tensor(r["teacher_losses"]) / first
        assert torch.allclose(torch.tensor(r["weights"]), 2 * ratio / ratio.sum(), atol=1e-4)
    assert json.loads((out / "distill.json").read_text()) == summary
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads the student
    cases = [(["--teachers", str(tmp_path / "teacher0"), *data], "expected at least 2"),
             (["--teachers", str(tmp_path / "teacher0"), str(tmp_path / "teacher1"), data[0], data[1]],
              "1 domain(s)"),
             (["--teachers", str(tmp_path / "teacher0"), str(tmp_path / "teacher1"), "--teacher",
               str(tmp_path / "teacher0"), *data], "--teacher and --teachers"),
             (["--teachers", str(tmp_path / "teacher0"), str(tmp_path / "teacher1"), *data, "--minutes", "1"],
              "no --minutes")]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["make", "distill", str(tmp_path / "student"), *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / "bad").exists()
