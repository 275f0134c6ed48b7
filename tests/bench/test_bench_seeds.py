"""`moekit bench seeds --quick` runs end to end: one record per contender, the paper's claim and the machine in
each; unknown systems are refused by name."""

import pytest

from moekit.bench.seeds import CLAIMS, SYSTEMS, bench_seeds
from moekit.errors import ConfigError


def test_quick_records_carry_claim_metrics_and_environment():
    records = bench_seeds(["thor", "sparse_ot"], quick=True)
    assert [r["system"] for r in records] == ["thor"] * 3 + ["sparse_ot"] * 3
    for r in records:
        assert r["paper_claim"] == CLAIMS[r["system"]] and 0 <= r["accuracy"] <= 1
        assert {"cpu", "torch", "threads", "steps", "seeds"} <= set(r)
    capped = [r for r in records if r["contender"].startswith("sparse_ot")][0]
    assert capped["max_tokens_per_expert"] <= 160  # ceil(1.25 * 256 * 2 / 4)
    assert set(SYSTEMS) == set(CLAIMS)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="--system"):
        bench_seeds(["nope"], quick=True)
    with pytest.raises(ConfigError, match="--seeds"):
        bench_seeds(["thor"], quick=True, seeds=0)
