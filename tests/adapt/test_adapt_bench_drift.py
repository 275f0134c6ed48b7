from __future__ import annotations

import itertools

from moekit.bench.drift import bench_drift, contenders, synthetic_streams
from moekit.cli.main import main


def test_synthetic_streams_are_reproducible_and_labelled():
    for name, make in synthetic_streams(400, seed=2).items():
        first = list(itertools.islice(make(), 50))
        assert first == list(itertools.islice(make(), 50)), name
        assert all(isinstance(x, dict) and y is not None for x, y in first)


def test_bench_records_carry_scores_ratios_and_machine():
    records = bench_drift(length=120, seed=0, models=["HoeffdingTree", "ARF10", "DriftMoE_data"], streams=["SEA_a"])
    assert [r["model"] for r in records] == ["HoeffdingTree", "ARF10", "DriftMoE_data"]
    for r in records:
        assert r["n"] == 120 and 0 <= r["accuracy"] <= 1 and r["us_per_instance"] > 0
        assert {"kappa_m", "kappa_t", "cpu", "torch", "threads"} <= set(r)
    assert records[0]["acc_minus_ht"] == 0 and records[1]["time_over_arf"] == 1
    assert set(contenders()) >= {"HoeffdingTree", "ARF10", "SRP10", "LevBag10", "DriftMoE_data", "DriftMoE_task"}


def test_cli_unknown_stream_exits_2(capsys):
    assert main(["bench", "drift", "--quick", "--stream", "ELEC"]) == 2
    assert "--stream 'ELEC'" in capsys.readouterr().err
