import json
import subprocess
import sys

import pytest

from moekit.bench.routers import ROUTER_SETUPS, table_rows
from moekit.core import router_names


def test_every_catalog_router_has_a_bench_setup():
    assert set(ROUTER_SETUPS) <= set(router_names())
    assert {"topk", "top_p", "null_experts", "expert_choice", "hash", "random", "smoe_dropout", "sinkhorn",
            "recurrent", "chain", "weak_strong", "small_big_skip", "film"} == set(ROUTER_SETUPS)


def test_bench_routers_quick_records():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli.main", "bench", "routers", "--quick", "--steps", "2",
                           "--router", "topk", "--router", "null_experts", "--seed", "3", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    topk, null = json.loads(proc.stdout)
    assert topk["router"] == "topk" and null["router"] == "null_experts"
    assert topk["seed"] == null["seed"] == 3
    assert topk["experts_per_token"] == 2.0 and topk["experts_per_token_dist"] == {"2": 1.0}
    assert all(v == 0 for v in topk["loss_minus_topk"].values())
    assert 0 <= null["experts_per_token"] <= 3  # k = 3 slots over real and null experts
    assert sum(null["experts_per_token_dist"].values()) == pytest.approx(1.0, abs=1e-3)
    for r in (topk, null):
        assert r["loss"] and all(2 < v < 10 for v in r["loss"].values())  # about log(vocabulary 300) = 5.7
        assert r["train_tokens_per_s"] > 0 and r["load_cv"] >= 0
    rows, cols = table_rows([topk, null])
    assert cols[0] == "router" and rows[1]["experts_per_token"] == null["experts_per_token"]


def test_bench_routers_refuses_unknown_router():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli.main", "bench", "routers", "--router", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--router nope" in proc.stderr and proc.stderr.count("\n") == 1


def test_bench_reroute_rows(monkeypatch):
    import moekit.bench.routers as br
    from moekit.default import default_model

    k = default_model().config.num_experts_per_tok
    settings = [("as trained", {}), ("k=1", {"k": 1}), ("skip", {"skip_threshold": 1.0})]
    monkeypatch.setattr(br, "REROUTES", settings)
    rows = br.bench_reroute(max_tokens=48, seq_len=24)
    plain, k1, skip, scmoe = rows
    assert plain["experts_per_token"] == k and k1["experts_per_token"] == 1.0
    assert skip["experts_per_token"] < k  # threshold 1: only exact ties keep a second expert
    assert scmoe["setting"] == f"SCMoE (top-{k} vs rank-2)"
    assert set(plain["loss"]) == {"code", "prose"} and all(0 < v < 12 for v in plain["loss"].values())
    assert k1["loss"] != plain["loss"]
    assert scmoe["loss"] is None and set(scmoe["accuracy"]) == {"code", "prose"}
