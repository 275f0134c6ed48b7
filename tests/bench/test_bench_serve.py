"""`moekit bench serve --quick --json`: every phase reported, every request answered completely with its own
prompt's text, and the machine recorded (a smoke run; the timings mean nothing here)."""

import json

import pytest

from moekit.cli.main import main


@pytest.mark.slow
def test_bench_serve_quick_json(capsys):
    assert main(["bench", "serve", "--quick", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    phases = [r["phase"] for r in records]
    assert phases == ["concurrency", "concurrency", "concurrency_ratio", "load", "scheduler", "scheduler",
                      "scheduler_ratio"]
    load = records[3]
    assert load["requests"] > 0 and load["completed"] == load["requests"]
    assert load["incomplete"] == load["text_differs"] == load["mixed_up"] == 0
    for r in records:
        assert r["cpu"] and r["torch"] and r["threads"] >= 1 and r["quick"] is True
    assert [r["scheduler"] for r in records[4:6]] == ["expert", "first-come"]
    assert all(r["incomplete"] == 0 and r["text_differs"] == 0 for r in records[4:6])


def test_bench_serve_bad_options(capsys):
    assert main(["bench", "serve", "--clients", "0"]) == 2
    assert "--clients 0" in capsys.readouterr().err
