"""The report: files written atomically, every plot embedded and rendered by headless Chromium; the CLI verb on a
checkpoint directory, on moekit-tiny, and on bad input."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest
import torch
from inspect_toy import WordTokenizer, docs_of, planted_lm

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.cli.main import main
from moekit.default import default_model_path
from moekit.inspect import compute_stats, trace
from moekit.inspect.report import ReportError, write_report

TOK = WordTokenizer()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_stats():
    model = planted_lm([0, 1, 2, 3, 0, 1, 2, 3], num_experts=4, perm=[1, 2, 3, 0])
    with torch.no_grad():
        for moe in model.moes:
            torch.nn.init.normal_(moe.experts.down_proj, std=0.01)
    docs = docs_of([0, 1, 4, 5] * 8, domain="prose") + docs_of([2, 3, 6, 7] * 8, domain="code")
    return compute_stats(trace(model, docs, TOK, progress=False), model, docs, TOK, progress=False)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_files_and_embedded_plots(tmp_path, toy_stats):
    report = write_report(toy_stats, tmp_path / "out")
    out = report.parent
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["load_heatmap.png", "entropy.png", "coactivation.png", "specialization.png",
                           "position.png", "transitions.png", "domain_share.png", "super_experts.png",
                           "expert_health.png"])
    page = report.read_text()
    images = _images(page)
    assert len(images) == len(pngs) and all(img.startswith(PNG_MAGIC) for img in images)
    assert sorted(images) == sorted((out / p).read_bytes() for p in pngs)
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(toy_stats))
    assert "<script src" not in page and "http" not in page.split("<body")[1]  # self-contained
    write_report(toy_stats, out)  # an earlier report is replaced
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_report_renders_in_headless_chromium(tmp_path, toy_stats):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (`make browser` installs it); cannot check the report renders")
    report = write_report(toy_stats, tmp_path / "out")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert total == 9 and loaded == total


def test_report_refuses_foreign_or_input_directories(tmp_path, toy_stats):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ReportError, match="not an inspect report"):
        write_report(toy_stats, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep"
    with pytest.raises(ReportError, match="contains the input"):
        write_report(toy_stats, tmp_path, inputs=[tmp_path / "notes.txt"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-MoE saved with moekit-tiny's tokenizer (same vocabulary size)."""
    d = tmp_path_factory.mktemp("ckpt") / "model"
    mh.save(tiny_model("qwen3_moe", vocab_size=4096), d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, d / name)
    return d


def test_cli_on_checkpoint_with_data_files_and_a_long_document(tmp_path, checkpoint, capsys):
    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 60)  # far longer than the 128-token context
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 80, "domain": "code"}) + "\n")
    out = tmp_path / "report"
    assert main(["inspect", str(checkpoint), "--data", str(prose), str(code), "--out", str(out),
                 "--max-tokens", "600"]) == 0
    assert "super experts:" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens"] == 600 and stats["domains"] == ["prose", "code"]
    assert [ly["layer"] for ly in stats["layers"]] == [0, 1]
    for ly in stats["layers"]:
        assert sum(ly["load"]) == pytest.approx(1.0)
        assert set(ly["domain_share"]) == {"prose", "code"}
    assert len(_images((out / "report.html").read_text())) == 9


def test_cli_default_model(tmp_path):
    out = tmp_path / "r"
    assert main(["inspect", "--out", str(out), "--max-tokens", "1024"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens"] == 1024 and stats["domains"] == ["code", "prose"]
    assert [ly["layer"] for ly in stats["layers"]] == [0, 1, 2, 3]
    experts = mh.view(mh.load(default_model_path()))[0].num_experts
    assert all(len(ly["load"]) == experts for ly in stats["layers"])


@pytest.mark.parametrize("content,message", [(b"", "no text in it"), (b"\x00\x01binary", "binary file")])
def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys, checkpoint, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["inspect", str(checkpoint), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit inspect: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_dense_model_and_out_equal_to_input(tmp_path, capsys, checkpoint):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(dense)
    capsys.readouterr()
    assert main(["inspect", str(dense), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit inspect: error: ") and "not a supported MoE family" in err and "\n" not in err
    data = tmp_path / "d.txt"
    data.write_text("hello world")
    assert main(["inspect", str(checkpoint), "--data", str(data), "--out", str(data)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert data.read_text() == "hello world"
