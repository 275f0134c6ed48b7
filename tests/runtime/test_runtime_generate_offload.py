import json

import pytest

from moekit.cli.main import main


def run_json(capsys, *args):
    assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_offloaded_equals_resident_and_reports(capsys):
    resident = run_json(capsys)
    for extra in (["--policy", "lfuda"], ["--prefetch", "next-layer"]):
        rec = run_json(capsys, "--expert-memory", "25%", *extra)
        assert rec["text"] == resident["text"]
        assert 0 <= rec["hit_rate"] < 1 and rec["bytes_read"] > 0 and rec["peak_rss_bytes"] > 0
        assert rec["peak_cached_bytes"] <= rec["expert_memory_bytes"] == rec["expert_bytes"] // 4
        assert rec["policy"] == extra[1] or rec["prefetch"] == extra[1]
    rec = run_json(capsys, "--expert-memory", "100%")
    assert rec["text"] == resident["text"] and "fully resident" in rec["offload_note"] and rec["hit_rate"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["--expert-memory", "10"], "smaller than one expert"),
    (["--expert-memory", "25%", "--policy", "mru"], "unknown cache policy 'mru'"),
    (["--expert-memory", "lots"], "expert memory 'lots'"),
    (["--expert-memory", "25%", "--prefetch", "predictor"], "no moekit-predictor.json"),
    (["--expert-memory", "25%", "--prefetch", "pregate"], "no pre-gating router"),
])
def test_generate_offload_bad_input_exits_2(capsys, args, message):
    assert main(["generate", "--prompt", "x", "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
