import json
import subprocess
import sys


def test_bench_train_quick_records():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli.main", "bench", "train", "--quick", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    step, ep = json.loads(proc.stdout)
    assert step["case"] == "tiny-step" and ep["case"] == "ep"
    assert step["moekit_over_transformers_tokens_per_s"] == round(step["transformers_ms"] / step["moekit_ms"], 3)
    assert ep["two_ranks_tokens_per_s"] > 0 and ep["one_rank_tokens_per_s"] > 0
    assert abs(ep["one_rank_tokens_per_s"] - ep["tokens"] / ep["one_rank_ms"] * 1e3) < 1
