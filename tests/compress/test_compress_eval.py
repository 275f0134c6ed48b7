"""Sliding-window perplexity against a per-token reference: every token after the first is predicted once, by the
first window whose targets reach it, from that window's start; per-domain numbers combine into the total."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf.tiny import tiny_model
from moekit.data import DataError, TextDoc
from moekit.eval import perplexity


class CharTokenizer:
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # noqa: ARG002
        return [3 + ord(c) % 90 for c in text]


def _reference_nll(model, ids: list[int], seq_len: int, stride: int) -> list[float]:
    """NLL of every token t >= 1 given ids[start:t], start the first window start whose targets reach t."""
    out = []
    for t in range(1, len(ids)):
        w = max(0, math.ceil((t - seq_len + 1) / stride))
        context = torch.tensor(ids[w * stride: t])[None]
        with torch.no_grad():
            logits = model(input_ids=context).logits[0, -1]
        out.append(float(F.cross_entropy(logits[None], torch.tensor([ids[t]]))))
    return out


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 5), (32, 31)])
def test_sliding_window_matches_the_per_token_reference(seq_len, stride):
    model = tiny_model("qwen3_moe")
    tok = CharTokenizer()
    docs = [TextDoc("the quick brown fox jumps over the lazy dog", "prose", "a"),
            TextDoc("def f(x):\n    return x * 2\n", "code", "b")]
    result = perplexity(model, tok, docs, seq_len=seq_len, stride=stride, progress=False)
    per_doc = [_reference_nll(model, tok.encode(d.text) + [2], seq_len, stride) for d in docs]
    assert result["tokens"] == sum(len(n) for n in per_doc)
    assert result["nll"] == pytest.approx(sum(map(sum, per_doc)) / result["tokens"], rel=1e-5)
    assert result["domains"]["prose"]["nll"] == pytest.approx(sum(per_doc[0]) / len(per_doc[0]), rel=1e-5)
    assert result["domains"]["code"]["tokens"] == len(per_doc[1])
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))


def test_token_cap_and_unlabelled_documents():
    model = tiny_model("mixtral")
    docs = [TextDoc("x" * 50, None, "a"), TextDoc("y" * 50, None, "b")]
    result = perplexity(model, CharTokenizer(), docs, seq_len=16, max_tokens=70, progress=False)
    assert result["tokens"] == 70
    assert "domains" not in result


def test_token_cap_is_shared_equally_among_domains():
    model = tiny_model("mixtral")
    docs = [TextDoc("c" * 50, "code", "a"), TextDoc("d" * 50, "code", "b"), TextDoc("p" * 50, "prose", "c")]
    result = perplexity(model, CharTokenizer(), docs, seq_len=16, max_tokens=60, progress=False)
    # code alone could fill the cap from its first document; each domain gets 30 predicted tokens instead
    assert {d: v["tokens"] for d, v in result["domains"].items()} == {"code": 30, "prose": 30}


def test_bad_windows_and_empty_data_are_refused():
    model = tiny_model("mixtral")
    with pytest.raises(DataError, match="stride"):
        perplexity(model, CharTokenizer(), [TextDoc("abc", None, "a")], seq_len=8, stride=8, progress=False)
    with pytest.raises(DataError, match="no document"):
        perplexity(model, CharTokenizer(), [TextDoc("", None, "a")], progress=False)


@pytest.mark.parametrize(("kw", "field"), [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"),
                                            ({"stride": 0}, "stride"), ({"seq_len": 0}, "seq_len"),
                                            ({"seq_len": 129}, "seq_len")])
def test_out_of_range_window_and_cap_are_refused_not_replaced(kw, field):
    """A cap below 1 used to score one token per domain, a 0 stride or length silently became the default, and a
    window longer than the model's context (128 here) ran past its positions."""
    model = tiny_model("mixtral")
    with pytest.raises(DataError, match=field):
        perplexity(model, CharTokenizer(), [TextDoc("x" * 300, None, "a")], progress=False, **kw)
