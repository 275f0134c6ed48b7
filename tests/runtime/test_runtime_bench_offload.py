import json

import pytest

from moekit.bench.offload import bound
from moekit.bench.offload_cgroup import cgroup_available
from moekit.bench.offload_large import finish, summary
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
    from moekit.bench import decode_llama
    from moekit.bench.offload_large import bench_large

    records = bench_large(0.15, 700, tokens=3, timeout=300, disk_mb=16, progress=False)
    by = {r["contender"]: r for r in records}
    capped = cgroup_available() is None
    for name in ("offload-1-slot", "offload-none", "offload-next-layer"):
        r = by[name]
        assert r["exit_code"] == 0 and r["decode_tokens_per_s"] > 0 and r["bytes_read"] > 0, r
        assert r["capped"] == capped and (r["oom_killed"] is False if capped else r["cgroup_note"])
        assert r["predictions"] == by["offload-1-slot"]["predictions"]  # every prefetch mode, the same tokens
        if capped:
            assert r["peak_cgroup_bytes"] <= 700 * 2**20
    assert by["offload-none"]["budget_honoured"] and by["offload-next-layer"]["budget_honoured"]
    assert by["offload-none"]["hit_rate"] < 1 and by["offload-none"]["bound_tokens_per_s"] > 0
    if capped:  # the checkpoint's pages were dropped first: its bytes come from the disk
        assert by["offload-1-slot"]["disk_read_bytes"] >= by["offload-1-slot"]["expert_bytes"] // 2
    if decode_llama.available():
        assert by["llama.cpp"]["exit_code"] == 0 and by["llama.cpp"]["decode_tokens_per_s"] > 0
        assert by["offload-none"]["vs_llama_cpp"] > 0
    else:
        assert by["llama.cpp"]["note"]
    assert "resident" in by and "offload-none" in summary(records)


def test_large_records_derived_fields_and_summary():
    env = {"kind": "large", "checkpoint_bytes": 4e9, "layers": 32, "experts_per_layer": 64, "k": 8, "new_tokens": 4,
           "prompt_tokens": 16, "threads": 2, "bw_ram_gb_s": 10.0, "bw_disk_gb_s": 1.0, "t_read_us": 100.0,
           "cap_mb": 2048, "capped": True, "expert_bytes": 4e9}
    slot = 3 * 2**20
    one = {**env, "contender": "offload-1-slot", "decode_tokens_per_s": 1.0, "peak_rss_bytes": 500 * 2**20,
           "budget_bytes": slot, "slot_bytes": slot, "hit_rate": 0.0, "experts_per_token": 256, "predictions": [1, 2]}
    off = {**one, "contender": "offload-none", "decode_tokens_per_s": 3.0, "peak_rss_bytes": 1500 * 2**20,
           "budget_bytes": 1000 * 2**20, "hit_rate": 0.5, "peak_cgroup_bytes": 2000 * 2**20, "oom_killed": False,
           "exit_code": 0}
    llama = {**env, "contender": "llama.cpp", "decode_tokens_per_s": 2.0, "predictions": [1, 3], "exit_code": 0}
    resident = {**env, "contender": "resident", "exit_code": -9, "oom_killed": True}
    records = [one, off, llama, resident]
    finish(records, one)
    assert off["vs_llama_cpp"] == pytest.approx(1.5) and llama["vs_llama_cpp"] == 1
    assert off["budget_honoured"] and off["rss_over_one_slot_bytes"] == 1000 * 2**20
    # 256 experts x 3 MiB, half from RAM at 10 GB/s, half from disk at 1 GB/s + 128 reads x 100 us
    b = 256 * slot
    assert off["bound_tokens_per_s"] == pytest.approx(1 / (0.5 * b / 1e10 + 0.5 * b / 1e9 + 128 * 1e-4))
    assert off["same_tokens_as_offload"] and not llama["same_tokens_as_offload"]
    text = summary(records)
    assert "cap 2048 MiB" in text and len(text.splitlines()) == 6
    row = next(line for line in text.splitlines() if line.startswith("offload-none"))
    assert "1.50" in row and "2000" in row and " no " in row
    assert "yes" in next(line for line in text.splitlines() if line.startswith("resident"))


def test_bench_offload_bad_options_exit_2(capsys):
    assert main(["bench", "offload", "--repeats", "0"]) == 2
    assert "--repeats=0" in capsys.readouterr().err
    assert main(["bench", "offload", "--large-only"]) == 2
    assert "--large-only" in capsys.readouterr().err
    assert main(["bench", "offload", "--large-gb", "1", "--cgroup-mb", "0"]) == 2
    assert "--cgroup-mb=0" in capsys.readouterr().err
