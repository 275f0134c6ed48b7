"""trace(): what it records, on toy moekit models with known routing and on every Hugging Face family."""

from __future__ import annotations

import pytest
import torch
from inspect_toy import WordTokenizer, docs_of, planted_lm
from torch import nn

import moekit.hf as mh
from hf.tiny import FAMILY_TYPES, tiny_model
from moekit.data import TextDoc
from moekit.errors import MoekitError
from moekit.inspect import InspectError, Trace, trace
from moekit.inspect.layers import find_layers

TOK = WordTokenizer()


def test_trace_records_planted_routing_positions_and_domains():
    first = [0, 1, 2, 3, 0, 1, 2, 3]
    model = planted_lm(first, num_experts=4, perm=[2, 0, 3, 1])
    docs = docs_of([0, 1, 2, 3, 4], domain="a") + docs_of([5, 6, 7], domain="b") + docs_of([1, 1])
    t = trace(model, docs, TOK, seq_len=3, progress=False)
    assert t.layers == [0, 1] and t.num_experts == [4, 4] and t.domain_names == ["a", "b"]
    assert t.num_tokens == 10
    ids = t.token_ids
    assert sorted(ids.tolist()) == sorted([0, 1, 2, 3, 4, 5, 6, 7, 1, 1])
    # routing is a pure function of the token id here
    assert torch.equal(t.indices(0)[:, 0], torch.tensor(first)[ids])
    assert torch.equal(t.indices(1)[:, 0], torch.tensor([2, 0, 3, 1])[torch.tensor(first)[ids]])
    assert torch.allclose(t.weights(0), torch.ones(10, 1))
    assert t.mask(0) is None
    # positions restart in every window of 3; the 5-token document is cut into 3 + 2
    by_doc = {d: sorted(t.positions[t.doc == d].tolist()) for d in range(3)}
    assert by_doc == {0: [0, 0, 1, 1, 2], 1: [0, 1, 2], 2: [0, 1]}
    assert [t.domains[n] for n in range(10)] == [["a", "b", None][d] for d in t.doc.tolist()]
    assert t.domain_ids[t.doc == 2].tolist() == [-1, -1]
    assert t.entropy(0).shape == (10,) and (t.entropy(0) >= 0).all()
    with pytest.raises(InspectError, match="record_logits"):
        t.logits(0)


def test_logits_recorded_and_disk_trace_equals_memory_trace(tmp_path):
    model = planted_lm([0, 1, 2, 3, 2, 1], num_experts=4, second=[1, 2, 3, 0, 0, 3], k=2)
    docs = docs_of([0, 1, 2, 3, 4, 5] * 7, domain="x")
    mem = trace(model, docs, TOK, seq_len=8, record_logits=True, progress=False, batch_size=2)
    disk = trace(model, docs, TOK, seq_len=8, record_logits=True, progress=False, batch_size=2,
                 out_dir=tmp_path / "tr")
    assert len(list((tmp_path / "tr").glob("chunk-*.safetensors"))) > 1
    again = Trace.load(tmp_path / "tr")
    for t in (disk, again):
        assert torch.equal(t.token_ids, mem.token_ids) and torch.equal(t.positions, mem.positions)
        for i in range(2):
            assert torch.equal(t.indices(i), mem.indices(i))
            assert torch.equal(t.logits(i), mem.logits(i))
    logits = mem.logits(0)
    assert logits.shape == (42, 4)
    assert torch.equal(logits.topk(2).indices, mem.indices(0))
    assert [p.name for p in tmp_path.iterdir()] == ["tr"]  # no temporary directory left behind


def test_out_dir_that_is_not_a_trace_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    model = planted_lm([0, 1], num_experts=2)
    with pytest.raises(MoekitError, match="not a trace directory"):
        trace(model, docs_of([0, 1]), TOK, out_dir=tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_max_tokens_is_shared_among_domains():
    model = planted_lm([0, 1], num_experts=2)
    docs = docs_of([0] * 50, [0] * 50, domain="a") + docs_of([1] * 50, domain="b")
    t = trace(model, docs, TOK, seq_len=16, max_tokens=40, progress=False)
    assert t.num_tokens == 40
    assert t.domains.count("a") == 20 and t.domains.count("b") == 20


def test_no_moe_layer_and_foreign_vocab_are_clear_errors():
    with pytest.raises(InspectError, match="no MoE layer"):
        trace(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10)), docs_of([1, 2]), TOK, progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    with pytest.raises(InspectError, match="no MoE layer"):
        trace(dense, docs_of([1, 2]), TOK, progress=False)
    with pytest.raises(InspectError, match="vocab_size is 97"):
        trace(tiny_model("mixtral"), docs_of([1, 200]), TOK, progress=False)
    with pytest.raises(MoekitError, match="tokenizer: required"):
        trace(tiny_model("mixtral"), docs_of([1, 2]), progress=False)


def _reference_indices(model, ids):
    """Each MoE block's routing recomputed by moekit.hf.reference_routing from the block's captured input."""
    blocks = mh.view(model)
    inputs = {}
    handles = [b.block.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
               for n, b in enumerate(blocks)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = []
    for n, b in enumerate(blocks):
        r = mh.reference_routing(b, inputs[n].reshape(-1, inputs[n].shape[-1]))
        out.append((r.indices.sort(dim=-1).values, r.indices))
    return out


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_traces_its_own_routing_accelerated_or_not(model_type):
    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 97, (11,), generator=g).tolist() for _ in range(3)]
    docs = [TextDoc(" ".join(map(str, s)), "d", "x") for s in seqs]
    t = trace(model, docs, TOK, progress=False)
    blocks = mh.view(model)
    assert t.layers == [b.layer for b in blocks]
    ids = torch.stack([torch.tensor(s) for s in seqs])
    assert torch.equal(t.token_ids, ids.reshape(-1))
    for i, (ref_sorted, _) in enumerate(_reference_indices(model, ids)):
        assert t.indices(i).shape == (33, blocks[i].k)
        assert torch.equal(t.indices(i).sort(dim=-1).values, ref_sorted)
    mh.accelerate(model)
    try:
        t2 = trace(model, docs, TOK, progress=False)
    finally:
        mh.restore(model)
    for i in range(len(blocks)):
        assert torch.equal(t2.indices(i), t.indices(i))
        assert torch.allclose(t2.weights(i), t.weights(i))


def test_find_layers_sees_moekit_layers_in_any_module():
    model = planted_lm([0, 1, 2], num_experts=3)
    layers = find_layers(model)
    assert [ly.layer for ly in layers] == [0, 1] and all(ly.is_moekit for ly in layers)
