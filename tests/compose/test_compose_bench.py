"""`moekit bench compose --quick` on a tiny random dense model: every setting present, numbers well formed, the
targets record consistent with the records it summarises. (Quality and speed are not asserted.)"""

from __future__ import annotations

import json
import math

from moekit.cli.main import main


def test_bench_compose_quick(capsys, dense_dir):
    assert main(["bench", "compose", "--quick", "--json", "--model", str(dense_dir)]) == 0
    records = json.loads(capsys.readouterr().out)
    by = {r["setting"]: r for r in records}
    domains = sorted(by["base"]["ppl"])
    assert domains == ["code", "fortunes", "glosses", "prose"]
    expected = {"base", *(f"lora:{d}" for d in domains), *(f"lora-moe:{r}" for r in ("topk", "dynmole", "mixer",
                                                                                      "soft")),
                *(f"route:{r}" for r in ("coe-tfidf", "coe-hidden", "glider-global", "glider-arrow", "glider", "kshot",
                                         "p-adapters", "p-adapter-input")),
                *(f"merge:{m}" for m in ("sum", "linear", "ties", "dare_linear", "svd", "orthogonal",
                                         "sft-composed")),
                *(f"compeft:{s}{x}" for s in ("", "std:") for x in (0.1, 0.05)), "targets"}
    assert set(by) == expected
    from moekit.compose.compeft import ALPHA_GRID

    for density in (0.1, 0.05):  # both scale rules, on the update A - A_init of LoRAs trained here
        std, lsq = by[f"compeft:std:{density}"], by[f"compeft:{density}"]
        assert std["scale"] == "std" and lsq["scale"] == "lsq" and std["update"] == lsq["update"] == "A - A_init"
        assert sorted(std["alpha"]) == domains and all(a in ALPHA_GRID for a in std["alpha"].values())
        assert std["compression_ratio"] == lsq["compression_ratio"]  # same mask and signs, another scale
    assert all(0 <= w <= 1 for w in by["route:p-adapter-input"]["own_weight"].values())
    for r in records[:-1]:
        assert sorted(r["ppl"]) == domains and all(math.isfinite(v) and v > 1 for v in r["ppl"].values()), r
        assert r["active_params"] >= by["base"]["active_params"] and "cpu" in json.dumps(r).lower()
        assert r["routing_accuracy"] is None or 0 <= r["routing_accuracy"] <= 1
    # model-level routers reuse the single LoRAs' per-document scores: a router that picked each document's own
    # expert would score exactly the oracle; kshot picks one expert per domain
    oracle = {d: by[f"lora:{d}"]["ppl"][d] for d in domains}
    for name in ("coe-tfidf", "coe-hidden", "glider-global", "kshot"):
        r = by[f"route:{name}"]
        if r["routing_accuracy"] == 1.0:
            assert all(math.isclose(r["ppl"][d], oracle[d], rel_tol=1e-9) for d in domains)
    targets = by["targets"]
    assert targets["routing"]["met"] == any(v >= 0.9 for v in targets["routing"]["measured"].values())
    assert targets["compeft"]["measured"]["compeft:0.1"]["ratio"] == by["compeft:0.1"]["compression_ratio"] > 8
    assert targets["orthogonal"]["max_excess"] == by["merge:orthogonal"]["max_excess_over_own"]
    assert set(targets["mixture"]["mixtures"]) == {s for s in by if s.startswith(("lora-moe:", "route:"))}
    # the exact sum of the domain LoRAs and PEFT's cat-free baselines are scored on the same documents as the base
    assert by["merge:sum"]["ppl"].keys() == by["base"]["ppl"].keys()


def test_bench_compose_bad_input(tmp_path, capsys, dense_dir):
    (tmp_path / "adapters" / "prose").mkdir(parents=True)
    cases = [(["--model", str(tmp_path / "none")], "no config.json; expected a checkpoint directory"),
             (["--model", str(dense_dir), "--adapters", str(tmp_path / "adapters")],
              "no adapter for domain 'prose'; expected"),
             (["--model", str(dense_dir), "--domain", "poetry"], "domain 'poetry' does not exist")]
    for argv, message in cases:
        assert main(["bench", "compose", "--quick", *argv]) == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
        assert len(lines) == 1 and message in lines[0], lines
