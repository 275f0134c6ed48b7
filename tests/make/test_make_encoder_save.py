"""A MoEfied BERT saved with moekit's manifest and modeling file: plain transformers loads it with
trust_remote_code and computes what the in-memory MoEfied encoder computes; a sentence-transformers input stays a
sentence-transformers model; `moekit make` on a BERT directory; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from make_families import tiny_bert_dir
from transformers import BertModel, BertTokenizerFast

from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.encoder import moefy_encoder
from moekit.make.encoder_save import load_encoder, save_encoder


def test_saved_encoder_loads_in_transformers_and_matches(tmp_path):
    tiny_bert_dir(tmp_path / "bert")
    model = BertModel.from_pretrained(tmp_path / "bert").eval()
    ids = torch.randint(0, 20, (3, 9))
    moefy_encoder(model, experts=4, k=2, layers=[1])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    save_encoder(model, tmp_path / "moe", source=tmp_path / "bert")
    loaded = load_encoder(tmp_path / "moe")
    assert type(loaded).__name__ == "MoekitBertModel"
    assert type(loaded.encoder.layer[0].intermediate).__name__ == "BertIntermediate"  # layer 0 stays dense
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).last_hidden_state, want, atol=1e-6)
    manifest = json.loads((tmp_path / "moe" / "moekit.json").read_text())
    assert manifest["moe"] == {"layers": [1], "num_experts": 4, "expert_width": 8, "k": 2}
    assert (tmp_path / "moe" / "vocab.txt").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        save_encoder(model, tmp_path / "moe")
    with pytest.raises(ConfigError, match="no MoEfied layer"):
        save_encoder(BertModel.from_pretrained(tmp_path / "bert"), tmp_path / "other")


def test_sentence_transformers_model_stays_one(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    tiny_bert_dir(tmp_path / "bert")
    word = modules.Transformer(str(tmp_path / "bert"))
    pool = modules.Pooling(word.get_embedding_dimension(), "mean")
    st.SentenceTransformer(modules=[word, pool, modules.Normalize()], device="cpu").save(str(tmp_path / "st"))
    before = {p.name for p in (tmp_path / "st").iterdir()}
    assert main(["make", str(tmp_path / "st"), "--experts", "4", "--k", "2", "--out", str(tmp_path / "moe"),
                 "--json"]) == 0
    assert {p.name for p in (tmp_path / "st").iterdir()} == before
    sentences = ["the quick brown fox", "a lazy dog runs under the list", "python code of experts"]
    moe = st.SentenceTransformer(str(tmp_path / "moe"), trust_remote_code=True, device="cpu")
    got = moe.encode(sentences, convert_to_tensor=True)
    # the same MoEfication in memory, pooled by hand: mean over real tokens, then L2-normalised
    ref_model = BertModel.from_pretrained(tmp_path / "st").eval()
    moefy_encoder(ref_model, experts=4, k=2)
    tok = BertTokenizerFast.from_pretrained(tmp_path / "st")
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(got.cpu(), want, atol=1e-5)
    dense = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(sentences, convert_to_tensor=True)
    assert not torch.allclose(got, dense, atol=1e-3)  # 2 of 4 experts: not the dense encoder


def test_cli_encoder_refusals(tmp_path, capsys):
    tiny_bert_dir(tmp_path / "bert")
    capsys.readouterr()
    for args, message in ((["--experts", "5", "--k", "2"], "experts=5"),
                          (["--experts", "4", "--k", "2", "--method", "upcycle"], "a BERT encoder is split"),
                          (["--experts", "4", "--k", "2", "--router", "dino"], "a BERT encoder is split"),
                          (["--experts", "4", "--k", "5"], "k=5"),
                          (["--experts", "4", "--k", "2", "--router", "learned"], "expected --data FILE")):
        assert main(["make", str(tmp_path / "bert"), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not (tmp_path / "x").exists()
