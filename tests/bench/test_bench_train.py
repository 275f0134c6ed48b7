import json
import subprocess
import sys


def test_bench_train_quick_records():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli.main", "bench", "train", "--quick", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    step, ep = json.loads(proc.stdout)
    assert step["case"] == "tiny-step" and ep["case"] == "ep"
    # the ratio is taken from unrounded times; the ms fields are rounded to 0.01 ms
    ratio = step["transformers_ms"] / step["moekit_ms"]
    assert abs(step["moekit_over_transformers_tokens_per_s"] - ratio) < 0.001 + 0.01 / step["moekit_ms"] * ratio
    assert ep["two_ranks_tokens_per_s"] > 0 and ep["one_rank_tokens_per_s"] > 0
    # tokens/s from the unrounded time; one_rank_ms is rounded to 0.01 ms, which moves tokens / ms by up to
    # tokens/s x 0.005 / ms
    expected = ep["tokens"] / ep["one_rank_ms"] * 1e3
    assert abs(ep["one_rank_tokens_per_s"] - expected) < 0.1 + expected * 0.005 / ep["one_rank_ms"]
