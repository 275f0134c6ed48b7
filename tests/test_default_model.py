"""The embedded default model moekit-tiny: present, a native transformers MoE, with its held-out split."""

import math

import pytest
import torch

import moekit
from moekit.default import DEFAULT_MODEL_DIR
from moekit.train.corpus import split_of

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="moekit-tiny not packaged")


def test_default_model_is_a_native_moe_checkpoint():
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    model = AutoModelForCausalLM.from_pretrained(moekit.default_model_path())  # plain transformers
    assert model.config.model_type == "qwen3_moe"
    blocks = mh.view(model)
    assert len(blocks) == model.config.num_hidden_layers and blocks[0].num_experts == 8
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 50 * 2**20


def test_held_out_split_is_held_out_and_has_both_domains():
    docs = moekit.default_test_split()
    assert {d["domain"] for d in docs} == {"prose", "code"}
    assert all(split_of(d["domain"], d["source"]) == "test" for d in docs)


def test_default_model_beats_chance_on_held_out_text():
    from moekit.train.package import perplexity

    model, tok = moekit.default_model(), moekit.default_tokenizer()
    for domain in ("prose", "code"):
        texts = [d["text"] for d in moekit.default_test_split() if d["domain"] == domain]
        ppl = perplexity(model, tok.backend_tokenizer, texts, 256, max_tokens=1024)
        assert math.isfinite(ppl) and ppl < tok.vocab_size / 10


def test_tokenizer_round_trip():
    tok = moekit.default_tokenizer()
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok.decode(tok(text).input_ids) == text
    assert torch.tensor(tok(text).input_ids).max() < moekit.default_model().config.vocab_size
