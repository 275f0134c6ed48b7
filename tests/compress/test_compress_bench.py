"""`moekit bench compress` on a tiny checkpoint: one row per method and ratio plus the quantizations, ratios against
the original and frequency pruning, bytes that fall as the experts go."""

from __future__ import annotations

import json
import shutil

import pytest

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.bench.compress import bench_compress
from moekit.compress import METHODS
from moekit.default import DEFAULT_MODEL_DIR, default_test_split


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    mh.save(tiny_model("qwen3_moe", vocab_size=4096), root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, root / "model" / name)
    docs = [{**d, "text": d["text"][:600]} for d in default_test_split()[:6]]
    (root / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    return root


def test_bench_rows_and_ratios(checkpoint):
    rows = bench_compress(str(checkpoint / "model"), [str(checkpoint / "data.jsonl")], ratios=(0.5,),
                          cal_tokens=128, eval_tokens=128)
    by = {(r["method"], r.get("ratio")): r for r in rows}
    original = by[("original", 0.0)]
    assert original["ppl_ratio"] == 1.0 and original["bytes_ratio"] == 1.0
    for method in METHODS:
        row = by[(method, 0.5)]
        assert row["ppl_ratio"] == pytest.approx(row["ppl"] / original["ppl"], rel=1e-3)
        assert row["bytes"] < original["bytes"]
    assert by[("frequency", 0.5)]["vs_frequency"] == 1.0
    assert by[("msmoe", 0.5)]["experts_per_layer"] == [3, 3]
    quant = {r["quant"].split(":")[0]: r for r in rows if r.get("quant")}
    assert quant["int4"]["bytes"] < quant["int8"]["bytes"] < original["bytes"]
    assert quant["ternary"]["bytes"] < quant["int4"]["bytes"]
    assert quant["mixed"]["bytes"] <= quant["int4"]["bytes"]


def test_speed_bench_times_every_variant_against_the_original(checkpoint):
    from moekit.bench.compress_speed import bench_compress_speed

    # fp32 only: this tiny checkpoint's widths are no multiple of 16 bytes in bf16, which transformers' own grouped_mm
    # experts path refuses (moekit-tiny is run in both dtypes by the bench's smoke run)
    rows = bench_compress_speed(str(checkpoint / "model"), [str(checkpoint / "data.jsonl")], prefill=16,
                                repeats=1, cal_tokens=128, dtypes=("fp32",))
    variants = {"original", "original, accelerated", "heapr 50%", "int8", "int4", "heapr 50% + int4"}
    assert {(r["dtype"], r["variant"]) for r in rows} == {("fp32", v) for v in variants}
    for dtype in ("fp32",):
        by = {r["variant"]: r for r in rows if r["dtype"] == dtype}
        assert by["original"]["prefill_ratio"] == by["original"]["token_ratio"] == 1.0
        assert by["int8"]["packed_matrices"] > 0 and by["original"]["packed_matrices"] == 0  # the kernels ran
        for r in by.values():
            assert r["prefill_ms"] > 0 and r["token_ms"] > 0 and r["cpu"] and r["threads"] >= 1
            assert r["prefill_ratio"] == pytest.approx(r["prefill_ms"] / by["original"]["prefill_ms"], rel=1e-2)
