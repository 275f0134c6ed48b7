"""`moekit bench tune`: fills the tune cache for moekit-tiny's expert shapes, prints what it chose, reuses the cache;
bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from moekit.cli.main import main
from moekit.core import tune


@pytest.fixture
def tuning_on(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEKIT_TUNE", "1")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    tune.set_tuner(None)
    yield tmp_path
    tune.set_tuner(None)


def test_bench_tune_fills_and_reuses_the_cache(tuning_on, capsys):
    assert main(["bench", "tune", "--quick", "--json", "--dtype", "fp32"]) == 0
    records = json.loads(capsys.readouterr().out)
    dispatch = [r for r in records if r["kind"] == "dispatch"]
    assert [r["tokens"] for r in dispatch] == [1, 4, 64]
    for r in dispatch:
        assert r["dtype"] == "fp32" and r["format"] == "dense" and r["chosen"] in r["ms"]
        assert r["chosen"] == min(r["ms"], key=r["ms"].get) and r["cpu"] and r["threads"] >= 1
    files = list(tuning_on.glob("tune-*.json"))
    assert len(files) == 1 and str(files[0]) == records[0]["cache_file"]
    saved = files[0].read_text()
    tune.set_tuner(None)  # a new process: everything comes from the file, nothing is measured again
    assert main(["bench", "tune", "--quick", "--json", "--dtype", "fp32"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r.get("chosen")) for r in again if r["kind"] == "dispatch"] == \
        [(r["kind"], r["chosen"]) for r in dispatch]
    assert files[0].read_text() == saved and not any(r.get("new") for r in again)


def test_bench_tune_and_layer_bad_input(monkeypatch, capsys):
    monkeypatch.setenv("MOEKIT_TUNE", "0")
    assert main(["bench", "tune", "--quick"]) == 2
    assert capsys.readouterr().err.strip().startswith("moekit bench: error: MOEKIT_TUNE=0: tuning is off")
    assert main(["bench", "layer", "--quick", "--dtype", "fp64"]) == 2
    assert capsys.readouterr().err.strip() == "moekit bench: error: --dtype='fp64': expected one of fp32, bf16"
