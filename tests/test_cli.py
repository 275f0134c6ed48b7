import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from moekit.bench.layer import CASES, _moekit_layer, _transformers_block
from moekit.cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit.cli.main", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def test_bench_layer_quick_json_records():
    proc = run_cli("bench", "layer", "--quick", "--repeats", "1", "--json", "--case", "prefill-8x2",
                   "--case", "decode-8x2")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [(r["case"], r["tokens"], r["dtype"]) for r in records] == [
        (case, tokens, dtype) for case, counts in (("prefill-8x2", (64,)), ("decode-8x2", (1, 4)))
        for dtype in ("fp32", "bf16") for tokens in counts]
    for r in records:
        assert r["cpu"] and isinstance(r["cpu_flags"], list) and r["torch"] == torch.__version__ and r["threads"] >= 1
        for fmt in ("int8", "int4"):  # the same experts quantized, timed in the same rounds
            assert r[f"moekit_{fmt}_ms"] > 0 and r[f"moekit_over_moekit_{fmt}"] > 0
        for field in ("moekit_ms", "transformers_eager_ms", "transformers_grouped_mm_ms", "dense_ms"):
            assert r[field] > 0
        assert abs(r["dense_over_moekit"] - r["dense_ms"] / r["moekit_ms"]) < 0.01 * r["dense_over_moekit"] + 1e-3
    decode = [r for r in records if r["case"] == "decode-8x2"]
    assert all(r["floor_ms"] > 0 and r["bytes_read"] > 0 for r in decode)
    assert records[0]["floor_ms"] is None


def test_bench_baselines_hold_the_same_function():
    """The transformers blocks the benchmark times compute what moekit computes, from the same parameters."""
    for case in (CASES[0].scaled(16), CASES[1].scaled(16)):
        torch.manual_seed(0)
        moe = _moekit_layer(case)
        x = torch.randn(1, 40, case.hidden)
        for impl in ("eager", "grouped_mm"):
            block = _transformers_block(case, moe, impl)
            assert block.experts.gate_up_proj is moe.experts.gate_up_proj
            with torch.no_grad():
                torch.testing.assert_close(block(x), moe(x).hidden, atol=1e-5, rtol=1e-5)


def test_user_errors_are_one_line_exit_2(capsys):
    assert main(["bench", "layer", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moekit bench: error: --repeats=0: expected a positive integer"
    proc = run_cli("bench", "layer", "--case", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_tour_runs_and_writes_report(tmp_path):
    proc = run_cli("tour", "--repeats", "1", "--out", str(tmp_path / "tour"))
    assert proc.returncode == 0, proc.stderr
    assert "tokens per expert" in proc.stdout and "prefill-8x2" in proc.stdout
    assert "greedy tokens identical: True" in proc.stdout
    page = (tmp_path / "tour" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "tokens per expert" in page
    assert page.count("<h2>") == 8 and "At a glance" in page  # the summary, then one section per step
    assert page.count("<table") == 7 and "<td>prefill-8x2</td>" in page  # tables are HTML tables
    assert "Making an MoE" in page and "<td>dense twin</td>" in page and "make (dense twin" in page
    assert page.count("class='sample'") == 4 and "sampled (temperature 0.8" in page
    assert "<script src" not in page and "http" not in page.split("<body")[1]  # self-contained
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (`make browser` installs it); cannot check the images load")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (tmp_path / "tour" / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert total == 3 and loaded == total  # training curve, load heatmap, domain plot
