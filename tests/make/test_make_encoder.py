"""MoEfication of a BERT encoder: exact with every expert, reversible, and the bench's metrics and data."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from moekit.bench import make as bench_make
from moekit.errors import ConfigError
from moekit.make.encoder import MoEFFN, capture_encoder_inputs, moefy_encoder, restore_encoder


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).to(dtype).eval()


def test_every_expert_equals_dense_and_restore_is_exact():
    model = tiny_bert(torch.float64)
    ids = torch.randint(0, 60, (3, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        moefy_encoder(model, experts=4, k=4)
        assert isinstance(model.encoder.layer[0].intermediate, MoEFFN)
        assert torch.allclose(model(input_ids=ids).last_hidden_state, ref, rtol=0, atol=1e-12)
        restore_encoder(model)
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
        moefy_encoder(model, experts=4, k=1)
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, ref, atol=1e-3)


def test_centred_experts_add_their_mean_and_stay_exact_at_full_k():
    model = tiny_bert(torch.float64)
    ids = torch.randint(0, 60, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = capture_encoder_inputs(model, [batch], [0, 1])
    assert inputs[0].shape == (14, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        moefy_encoder(model, experts=4, k=4, router="learned", inputs=inputs, centred=True)
        assert torch.allclose(model(input_ids=ids).last_hidden_state, ref, atol=1e-6)
        ffn = model.encoder.layer[0].intermediate
        assert float(ffn.experts.down_proj_bias.abs().max()) > 0  # the means moved into the biases


def test_bad_settings():
    model = tiny_bert()
    with pytest.raises(ConfigError, match="experts=5"):
        moefy_encoder(model, experts=5, k=2)
    with pytest.raises(ConfigError, match="k=9"):
        moefy_encoder(model, experts=4, k=9)
    with pytest.raises(ConfigError, match="needs calibration"):
        moefy_encoder(model, experts=4, k=2, router="learned")
    with pytest.raises(ConfigError, match="no BERT encoder"):
        moefy_encoder(torch.nn.Linear(2, 2), experts=4, k=2)


def test_metrics_hand_computed():
    e = torch.eye(3)
    assert bench_make.mrr(e, e) == 1.0
    docs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert bench_make.mrr(e, docs) == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # rows 0 and 1 rank their doc second
    x = torch.nn.functional.normalize(torch.randn(20, 5), dim=1)
    assert bench_make.overlap_at(x, x, n=3) == 1.0
    assert bench_make.overlap_at(x, -x, n=3) == 1.0  # the same cosines
    assert bench_make.overlap_at(x, torch.nn.functional.normalize(torch.randn(20, 5), dim=1), n=3) < 0.8


def test_wordnet_pairs_parsed(tmp_path, monkeypatch):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist; "the entity was '
        'seen here"\n'
        "00001930 03 n 01 thing 0 000 | a glossed synset without an example\n")
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    monkeypatch.setattr(bench_make, "WORDNET", tmp_path)
    assert bench_make.wordnet_pairs() == [("the entity was seen here", "that which is perceived to exist")]


def test_d2d_dynamic_k_encoder(tmp_path):
    """D2DMoE in the encoder: each token's FFN output is the dense FFN restricted to the experts dynamic_k picks
    from the norm router's predictions (hand-computed), and a lower tau uses fewer experts per token."""
    from moekit.make.encoder import experts_per_token
    from moekit.make.encoder_save import save_encoder
    from moekit.make.routers import dynamic_k

    model = tiny_bert()
    ids = torch.randint(0, 60, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = capture_encoder_inputs(model, [batch], [0, 1])
    used = {}
    for tau in (0.3, 0.95):
        moefy_encoder(model, experts=4, k=1, router="d2d", inputs=inputs, tau=tau)
        ffn = model.encoder.layer[0].intermediate
        x = inputs[0]
        with torch.no_grad():
            mask = dynamic_k(ffn.norm_router(x), tau)
            intermediate, dense_out = ffn.original
            a = intermediate(x)
            keep = torch.zeros_like(a)
            for e, s in enumerate(ffn_partition(ffn, intermediate)):
                keep[:, s] = mask[:, e:e + 1].float()
            want = (a * keep) @ dense_out.weight.t() + dense_out.bias
            assert torch.allclose(ffn(x), want, atol=1e-5)
        used[tau] = experts_per_token(model)
        if tau == 0.95:
            with pytest.raises(ConfigError, match="dynamic-k"):
                save_encoder(model, tmp_path / "d2d")
        restore_encoder(model)
    assert 1.0 <= used[0.3] < used[0.95] <= 4.0
    with pytest.raises(ConfigError, match="tau=1.5"):
        moefy_encoder(model, experts=4, k=1, router="d2d", inputs=inputs, tau=1.5)
    with pytest.raises(ConfigError, match="needs calibration"):
        moefy_encoder(model, experts=4, k=1, router="d2d")


def ffn_partition(ffn, intermediate):
    """The neuron indices of each expert, read back from its input rows."""
    rows = intermediate.dense.weight
    return [torch.nonzero((ffn.experts.gate_up_proj[e][:, None, :] == rows[None]).all(-1).any(0)).flatten()
            for e in range(ffn.experts.num_experts)]


def test_quick_bench_on_a_tiny_encoder(tmp_path, monkeypatch):
    """`bench_make(quick=True)` end to end with a tiny BERT standing in for MiniLM, made-up (example, gloss) pairs
    standing in for WordNet and the speed records stubbed (no timing in tests): every setting is there, dense
    retrieval is self-consistent, and D2DMoE's record reports its measured experts per token."""
    from make_families import WORDS, tiny_bert_dir
    from transformers import BertModel

    tok = tiny_bert_dir(tmp_path / "bert")
    model = BertModel.from_pretrained(tmp_path / "bert").eval()
    g = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    pairs = [(sentence(6), sentence(9)) for _ in range(200)]
    monkeypatch.setattr(bench_make, "load_minilm", lambda: (model, tok))
    monkeypatch.setattr(bench_make, "wordnet_pairs", lambda limit=None: pairs[:limit])
    monkeypatch.setattr(bench_make, "_speed", lambda *_a, **_k: {"stub": True})
    records = bench_make.bench_make(quick=True, progress=False)
    settings = [(r["setting"], r.get("router"), r.get("active")) for r in records]
    assert settings[0] == ("dense", None, None)
    assert [(s, r) for s, r, _ in settings[1:5]] == [("moefied", "centroid"), ("moefied", "learned")] * 2
    d2d = records[5]
    assert d2d["router"] == "d2d" and 1.0 <= d2d["experts_per_token"] <= 8.0
    assert d2d["active"] == pytest.approx(d2d["experts_per_token"] / 8, abs=1e-3)
    assert records[-1]["setting"] == "speed" and records[-1]["stub"]
    assert all(-1.0 <= r["cos_mean"] <= 1.0 for r in records[1:6])
