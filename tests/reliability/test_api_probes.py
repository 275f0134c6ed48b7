"""Issue 14's API probes (defects 17, 18, 19, 20): `moekit.MoE`, `moekit.inspect.trace` and `moekit.hf.save` refuse
bad arguments with a MoekitError whose message names the argument. Before the fix: bare ValueError, IndexError,
ZeroDivisionError or AttributeError, or a silently accepted value (normalize="yes", jitter=nan, a seq_len beyond
the model's context)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moekit
import moekit.hf as mh
from moekit.data import TextDoc
from moekit.default import default_model, default_tokenizer
from moekit.errors import MoekitError
from moekit.inspect import trace

# --- defect 17: moekit.MoE ------------------------------------------------------------------------------------------

MOE_CASES = {
    "router_options a string": (dict(router_options="x"), "router_options"),
    "router_options a list": (dict(router_options=[("normalize", False)]), "router_options"),
    "normalize a string": (dict(router_options={"normalize": "yes"}), "normalize='yes'"),
    "jitter nan": (dict(router_options={"jitter": math.nan}), "jitter=nan"),
    "jitter a string": (dict(router_options={"jitter": "0.1"}), "jitter='0.1'"),
    "n_group a float": (dict(router="deepseek_v3", router_options={"n_group": 1.5}), "n_group=1.5"),
    "k a string": (dict(k="2"), "k='2'"),
    "capacity_factor inf": (dict(capacity_factor=math.inf), "capacity_factor=inf"),
    "alpha nan": (dict(activation="gpt_oss", alpha=math.nan), "alpha=nan"),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_arguments_are_refused_by_name(case):
    kwargs, needle = MOE_CASES[case]
    with pytest.raises(MoekitError) as info:
        moekit.MoE(16, 32, 4, **kwargs)
    assert needle in str(info.value)


def test_moe_refuses_0_dim_and_non_tensor_input():
    moe = moekit.MoE(16, 32, 4)
    with pytest.raises(MoekitError, match=r"hidden: .*got shape \[\]"):
        moe(torch.tensor(1.0))
    with pytest.raises(MoekitError, match="hidden: a list"):
        moe([[0.0] * 16])
    assert moe(torch.randn(3, 16)).hidden.shape == (3, 16)  # the checks let good input through


# --- defects 18 and 20: moekit.inspect.trace --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return default_model(), default_tokenizer()


DOCS = [TextDoc("The quick brown fox jumps over the lazy dog.", "prose", "a")]


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(docs=[]), "docs: empty"),
    (dict(docs=["plain text"]), "docs: holds a str"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=2.0), "batch_size=2.0"),
    (dict(max_tokens=-3), "max_tokens=-3"),
    (dict(seq_len=0), "seq_len=0"),
    (dict(seq_len=10**6), "seq_len=1000000: expected at most the model's context"),
])
def test_trace_arguments_are_refused_by_name(tiny, kwargs, needle):
    model, tok = tiny
    kwargs = {"docs": DOCS, **kwargs}
    with pytest.raises(MoekitError) as info:
        trace(model, kwargs.pop("docs"), tok, progress=False, **kwargs)
    assert needle in str(info.value)


def test_trace_at_the_model_context_still_works(tiny):
    model, tok = tiny
    t = trace(model, DOCS, tok, seq_len=model.config.max_position_embeddings, progress=False, batch_size=1)
    assert t.num_tokens > 5


# --- defect 19: moekit.hf.save ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["lots", "0GB", "1.5GB", -1, 0, True, "10"])
def test_save_refuses_a_bad_max_shard_size(size, tmp_path):
    from hf.tiny import tiny_model

    with pytest.raises(MoekitError, match="max_shard_size="):
        mh.save(tiny_model("mixtral"), tmp_path / "out", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(MoekitError, match="model: a Linear; expected a transformers causal LM"):
        mh.save(nn.Linear(2, 2), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_with_a_small_shard_size_shards(tmp_path):
    from hf.tiny import tiny_model

    out = mh.save(tiny_model("mixtral"), tmp_path / "out", max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    assert mh.load(out) is not None
