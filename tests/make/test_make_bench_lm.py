"""`moekit bench make --lm MODEL --quick` on a tiny random dense DeepSeek-V3 with its own tokenizer: every record
is there, the ratios are the perplexities' ratios, upcycling starts equal to dense, and the expert plans."""

from __future__ import annotations

import json

import pytest
from make_families import TEXT, dense_config, dense_model, save_tiny_tokenizer

import moekit.make as mk
from moekit.bench.make_lm import split_plan
from moekit.cli.main import main


def test_split_plan_counts_the_shared_part():
    assert split_plan(dense_config("deepseek_v3", width=448), 0.5) == (15, 1, 7)  # the dense twin's width 7 x 64
    assert split_plan(dense_config("deepseek_v3", width=448), 0.25) == (15, 1, 3)
    assert split_plan(dense_config("qwen3", width=64), 0.25) == (16, 0, 4)
    assert split_plan(dense_config("qwen2", width=72), 0.5) == (7, 1, 3)


def _tiny_dense_and_docs(tmp_path):
    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("deepseek_v3", vocab=vocab, ffn_std=0.05).save_pretrained(src)
    data = tmp_path / "docs.jsonl"
    words = TEXT.split()
    data.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i]) * 3, "domain": "ab"[i % 2]}) + "\n"
                            for i in range(12)))
    return src, data


def test_quick_lm_bench(tmp_path, capsys):
    src, data = _tiny_dense_and_docs(tmp_path)
    assert main(["bench", "make", "--lm", str(src), "--quick", "--steps", "4", "--data", str(data), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    settings = [r["setting"] for r in records]
    assert settings == ["dense"] + (["moefied"] * 2 + ["moefied+distill", "moefied+finetune"]) * 2 + \
        ["upcycled", "upcycled+finetune", "dense+finetune", "btx", "bam"]
    dense_ppl = records[0]["ppl"]
    for r in records[1:]:
        assert r["ppl_over_dense"] == pytest.approx(r["ppl"] / dense_ppl, rel=1e-3)
    assert records[1]["active"] == 0.5 and (records[1]["experts"], records[1]["shared"], records[1]["k"]) == (7, 1, 3)
    assert records[5]["active"] == 0.25 and records[5]["k"] == 1
    assert [r["train_steps"] for r in records if "finetune" in r["setting"]] == [4, 4, 4, 4]  # --steps
    assert records[-2]["domains"] == ["a", "b"] and records[-2]["train_steps"] == 4  # 2 branches x 2 steps
    upcycled = next(r for r in records if r["setting"] == "upcycled")
    assert upcycled["ppl_over_dense"] == pytest.approx(1.0, abs=1e-3)  # copies: the dense model at step 0


def test_moefied_only_at_one_fraction(tmp_path, capsys):
    src, data = _tiny_dense_and_docs(tmp_path)
    assert main(["bench", "make", "--lm", str(src), "--quick", "--steps", "3", "--active", "0.5", "--moefied-only",
                 "--data", str(data), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in records] == ["dense", "moefied", "moefied", "moefied+distill", "moefied+finetune"]
    assert records[-1]["active"] == 0.5 and records[-1]["train_steps"] == 3


def test_lm_bench_refusals(tmp_path, capsys):
    assert main(["bench", "make", "--minutes", "3"]) == 2
    assert "--minutes: only with --lm" in capsys.readouterr().err
    assert main(["bench", "make", "--lm", str(tmp_path), "--steps", "3", "--minutes", "1"]) == 2
    assert "--steps=3: expected a positive integer, without --minutes" in capsys.readouterr().err
    assert main(["bench", "make", "--lm", str(tmp_path), "--active", "1.5"]) == 2
    assert "--active=[1.5]: expected fractions strictly between 0 and 1" in capsys.readouterr().err
    assert main(["bench", "make", "--moefied-only"]) == 2
    assert "--moefied-only: only with --lm" in capsys.readouterr().err
    moe_dir = tmp_path / "moe"
    mk.moefy(dense_model("deepseek_v3"), experts=8, k=2)[0].save_pretrained(moe_dir)
    capsys.readouterr()
    assert main(["bench", "make", "--lm", str(moe_dir), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already an MoE" in err[0]
