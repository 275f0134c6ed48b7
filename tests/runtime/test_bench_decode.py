"""`moekit bench decode --quick`: runs end to end, every record carries the machine and the contenders' rates, and
moekit's decode path gives transformers' tokens in fp32."""

from __future__ import annotations

import json

import pytest

from checkpoints import v1_shaped_checkpoint
from moekit.bench import decode_llama
from moekit.bench.decode import bench_decode
from moekit.cli.main import main


def test_quick_records_carry_rates_ratios_and_the_machine():
    records = bench_decode(quick=True, peers=False, dtypes=("fp32",), threads=(1, 2))
    assert [(r["dtype"], r["threads"]) for r in records] == [("fp32", 1)]  # quick: the first thread count
    for r in records:
        for key in ("transformers_tokens_per_s", "moekit_tokens_per_s", "moekit_over_transformers", "cpu",
                    "cpu_flags", "torch", "threads", "new_tokens", "prompt_tokens", "params"):
            assert key in r, key
        assert r["transformers_tokens_per_s"] > 0 and r["moekit_tokens_per_s"] > 0
        assert r["llama_cpp"] == "not asked" and r["prompt_tokens"] == 16
    assert records[0]["same_tokens"] is True  # fp32: token for token


def test_cli_refuses_an_unknown_dtype_and_prints_json(capsys):
    try:
        code = main(["bench", "decode", "--quick", "--dtype", "fp8"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    capsys.readouterr()
    assert main(["bench", "decode", "--quick", "--no-peers", "--dtype", "int4", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["dtype"] == "int4" and records[0]["moekit_tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not decode_llama.available(), reason="llama_cpp or its source tree absent (make bench-peers)")
def test_llama_cpp_runs_the_same_weights():
    """A Qwen3-MoE shaped like moekit-tiny v1 (random weights, the default's tokenizer) through llama.cpp's converter
    (pre-tokenizer mapped) in f32 gives transformers' greedy tokens; q4_0 through llama.cpp's quantizer runs. (The
    v2 default, DeepSeek-V3 with 4 layers and no q_lora_rank, is a shape llama.cpp does not load.)"""
    records = bench_decode(str(v1_shaped_checkpoint()), quick=True, dtypes=("fp32", "int4"))
    assert records[0]["gguf"] == "model-f32.gguf" and records[0]["llama_cpp_tokens_equal_to_transformers"] == 8
    assert records[1]["gguf"] == "model-q4_0.gguf" and records[1]["llama_cpp_tokens_per_s"] > 0
    assert all("llama_cpp_over_moekit" in r and r["llama_cpp_version"] for r in records)


def test_large_shape_follows_the_default_family_and_refuses_an_unknown_one():
    """The large random model is of moekit-tiny's family (DeepSeek-V3, with the q_lora_rank llama.cpp needs); the
    v1 family stays available; an unknown family is one ConfigError naming the option."""
    from moekit.bench.decode import _large_config, large_shape
    from moekit.default import default_model_path
    from moekit.errors import ConfigError

    default_family = json.loads((default_model_path() / "config.json").read_text())["model_type"]
    assert large_shape().family == default_family
    config = _large_config(large_shape("deepseek_v3"))
    assert config.q_lora_rank and config.n_routed_experts == 64 and config.num_experts_per_tok == 6
    assert _large_config(large_shape("qwen3_moe")).num_experts == 32
    with pytest.raises(ConfigError, match="--large-family"):
        large_shape("llama")


@pytest.mark.slow
@pytest.mark.skipif(not decode_llama.available(), reason="llama_cpp or its source tree absent (make bench-peers)")
def test_llama_cpp_runs_the_large_deepseek_v3():
    """The large DeepSeek-V3 (2 layers in quick form, q_lora_rank set) converts and gives transformers' tokens."""
    records = bench_decode(large=True, quick=True, dtypes=("fp32",), large_family="deepseek_v3")
    assert records[0]["model"] == "large-random-deepseek_v3"
    assert records[0]["llama_cpp_tokens_equal_to_transformers"] == 8 and records[0]["same_tokens"] is True
