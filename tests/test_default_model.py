"""The embedded default model moekit-tiny: present, a native transformers MoE, with its held-out split."""

import math

import pytest
import torch

import moekit
from moekit.default import DEFAULT_DENSE_DIR, DEFAULT_MODEL_DIR
from moekit.train.corpus import split_of

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="moekit-tiny not packaged")


def test_default_model_is_a_fine_grained_native_moe_checkpoint():
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    model = AutoModelForCausalLM.from_pretrained(moekit.default_model_path())  # plain transformers, offline
    cfg = model.config
    assert cfg.model_type == "deepseek_v3"
    blocks = mh.view(model)
    assert len(blocks) == cfg.num_hidden_layers and all(b.num_experts >= 32 for b in blocks)
    assert cfg.num_experts_per_tok >= 4 and cfg.n_shared_experts >= 1
    assert all(b.shared is not None for b in blocks)
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6
    # the balancing bias survives packaging in float32 and is not all zeros (it was trained)
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().max() > 0


def test_dense_twin_loads_and_matches_the_active_flops():
    from transformers import AutoModelForCausalLM

    moe = moekit.default_model().config
    dense_model = AutoModelForCausalLM.from_pretrained(moekit.default_dense_model_path())  # plain transformers
    dense = dense_model.config
    assert dense.model_type == moe.model_type and dense.first_k_dense_replace == dense.num_hidden_layers
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "vocab_size")
    assert all(getattr(dense, k) == getattr(moe, k) for k in same)
    # a dense MLP as wide as the routed experts chosen per token plus the shared ones
    assert dense.intermediate_size == (moe.num_experts_per_tok + moe.n_shared_experts) * moe.moe_intermediate_size
    assert not any(hasattr(layer.mlp, "experts") for layer in dense_model.model.layers)
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(moekit.default_dense_model()(input_ids=x).logits).all()


def test_shipped_models_fit_the_size_budget():
    size = sum(p.stat().st_size for d in (DEFAULT_MODEL_DIR, DEFAULT_DENSE_DIR) for p in d.iterdir())
    assert size < 60 * 2**20


def test_held_out_split_is_held_out_and_has_both_domains():
    docs = moekit.default_test_split()
    assert {d["domain"] for d in docs} == {"prose", "code"}
    assert all(split_of(d["domain"], d["source"]) == "test" for d in docs)


def test_both_models_beat_chance_on_held_out_text():
    from moekit.train.package import perplexity

    tok = moekit.default_tokenizer()
    for model in (moekit.default_model(), moekit.default_dense_model()):
        for domain in ("prose", "code"):
            texts = [d["text"] for d in moekit.default_test_split() if d["domain"] == domain]
            ppl = perplexity(model, tok.backend_tokenizer, texts, 256, max_tokens=1024)
            assert math.isfinite(ppl) and ppl < tok.vocab_size / 10


def test_tokenizer_round_trip():
    tok = moekit.default_tokenizer()
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok.decode(tok(text).input_ids) == text
    assert torch.tensor(tok(text).input_ids).max() < moekit.default_model().config.vocab_size
