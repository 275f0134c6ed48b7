import json

import pytest

from moekit.bench.offload import bound
from moekit.bench.offload_large import cgroup_available
from moekit.cli.main import main


def test_bound_by_hand():
    # B = 4 experts x 1 MB; all hits: 4 MB at 4 GB/s -> 1 ms; all misses at 1 GB/s + 4 x 100 us -> 4.4 ms
    assert bound(0.0, 4, 10**6, 4e9, 1e9, 1e-4) == pytest.approx(1000)
    assert bound(1.0, 4, 10**6, 4e9, 1e9, 1e-4) == pytest.approx(1 / 0.0044)


@pytest.mark.slow
def test_bench_offload_quick_end_to_end(capsys):
    assert main(["bench", "offload", "--quick", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    live = [r for r in records if r["kind"] == "live"]
    assert live and all(r["lossless"] for r in live)
    assert all(r["cpu"] and r["torch"] and r["threads"] >= 1 for r in records)
    for r in live:
        if r["budget"] < 1:
            assert r["peak_cached_bytes"] <= r["budget_bytes"] and r["bound_tokens_per_s"] > 0
    replay = [r for r in records if r["kind"] == "replay"]
    best = max(r["hit_rate"] for r in replay if r["policy"] == "belady")
    assert all(r["hit_rate"] <= best for r in replay if r["prefetch"] == "none")


@pytest.mark.slow
def test_bench_large_under_a_cgroup_cap():
    from moekit.bench.offload_large import bench_large

    records = bench_large(0.2, 1500, tokens=3, timeout=300)
    offload = next(r for r in records if r["contender"] == "offload")
    assert offload["exit_code"] == 0 and offload["decode_tokens_per_s"] > 0
    assert offload["bytes_read"] > 0 and offload["hit_rate"] < 1
    # the budget is honoured: peak RSS over a one-expert cache's stays within the budget + 2 experts + 32 MiB
    assert offload["budget_honoured"], offload
    resident = next(r for r in records if r["contender"] == "resident")
    assert resident["exit_code"] != 0 or resident["peak_rss_bytes"] > offload["peak_rss_bytes"]
    if cgroup_available() is None:
        assert offload["capped"] and not offload["oom_killed"]
        assert offload["peak_cgroup_bytes"] <= 1200 * 2**20
    else:
        assert not offload["capped"] and offload["cgroup_note"]
    assert "not run" in next(r for r in records if r["contender"] == "llama.cpp")["note"]


def test_bench_offload_bad_options_exit_2(capsys):
    assert main(["bench", "offload", "--repeats", "0"]) == 2
    assert "--repeats=0" in capsys.readouterr().err
