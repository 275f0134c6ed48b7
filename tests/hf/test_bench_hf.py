"""`moekit bench hf-accelerate --quick --json`: a smoke run with every field present and both contenders agreeing."""

from __future__ import annotations

import json

from moekit.cli.main import main

FIELDS = {"case", "tokens", "layers", "hidden", "experts", "k", "intermediate", "vocab", "dtype", "threads", "repeats",
          "transformers_experts_implementation", "transformers_ms", "moekit_ms", "moekit_loop_ms",
          "moekit_grouped_mm_ms", "transformers_over_moekit"}


def test_quick_run_json(capsys):
    assert main(["bench", "hf-accelerate", "--quick", "--json", "--repeats", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in records] == ["prefill", "generate-4"]
    for r in records:
        assert r.keys() >= FIELDS
        assert r["transformers_ms"] > 0 and r["moekit_ms"] > 0
        ratio = r["transformers_ms"] / r["moekit_ms"]
        assert abs(r["transformers_over_moekit"] - ratio) <= 0.01 * ratio + 1e-3
    assert records[0]["max_abs_logit_diff"] < 1e-4
    assert records[1]["same_tokens"] is True


def test_table_output(capsys):
    assert main(["bench", "hf-accelerate", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["case", "tokens", "transformers_ms", "moekit_ms", "transformers_over_moekit"]
    assert len(out) == 3
