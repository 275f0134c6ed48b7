"""`moekit generate`: the streamed text and the JSON record carry transformers' greedy tokens; user mistakes exit 2
with one line."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli.main import main
from moekit.runtime.decode import load_for_decode

PROMPT = "def area(radius):\n"


@pytest.fixture(scope="module")
def reference_text() -> str:
    model, tok = load_for_decode(None, accelerate=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_json_record_has_the_fields_and_transformers_text(capsys, reference_text):
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "text", "dtype",
                "experts", "lean_step", "threads", "cpu", "cpu_flags", "torch"):
        assert key in record, key
    assert record["new_tokens"] == 12 and record["prompt_tokens"] > 0 and record["dtype"] == "fp32"
    assert record["prefill_tokens_per_s"] > 0 and record["decode_tokens_per_s"] > 0
    assert record["text"] == reference_text
    assert record["experts"] == "moekit" and record["lean_step"] is True  # MOEKIT_TUNE=0: moekit's dispatch


def test_streamed_text_is_the_generated_text_then_rates_on_stderr(capsys, reference_text):
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--dtype", "bf16"]) == 0
    out, err = capsys.readouterr()
    assert len(out.rstrip("\n")) > 0
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == reference_text + "\n"
    assert "tokens/s" in err.splitlines()[-1] and "fp32" in err.splitlines()[-1]


def test_prompt_longer_than_the_context_is_one_line_exit_2(capsys):
    assert main(["generate", "--prompt", "word " * 700, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moekit generate: error: the prompt has") and "context is 256" in err[-1]


@pytest.mark.parametrize("argv", [["--dtype", "fp8"], ["--max-new-tokens", "0"], ["--temperature", "-1"],
                                  ["--compile", "--experts", "moekit"]])
def test_bad_options_exit_2(argv, capsys):
    try:
        code = main(["generate", "--prompt", "x", *argv])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.strip()
