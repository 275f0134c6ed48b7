"""The families table and view(model): the right layers, the model's own tensors, the family's own routing."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import moekit.hf as mh
from moekit.core.dispatch import dispatch, plan_dispatch
from moekit.errors import ConfigError, MoekitError, UnknownNameError
from moekit.hf.view import decoder_layers

ROUTER_PARAMS = {"gpt_oss": {"weight", "bias"}, "deepseek_v3": {"weight", "e_score_correction_bias"}}


def test_table_covers_the_nine_families():
    assert set(mh.FAMILIES) == set(FAMILY_TYPES)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family_detected_and_layers_found(model_type):
    model = tiny_model(model_type)
    family = mh.family_of(model.config)
    assert family.model_type == model_type
    views = mh.view(model)
    moe_by_module = [i for i, layer in enumerate(decoder_layers(model))
                     if hasattr(getattr(layer, family.block), family.router)]
    assert [v.layer for v in views] == moe_by_module == family.moe_layers(model.config)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_view_holds_the_models_own_tensors(model_type):
    model = tiny_model(model_type)
    family = mh.family_of(model.config)
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for v in mh.view(model):
        hf_experts = getattr(v.block, family.experts)
        assert v.experts.gate_up_proj is hf_experts.gate_up_proj
        assert v.experts.down_proj.data_ptr() == hf_experts.down_proj.data_ptr()
        assert v.router is getattr(v.block, family.router)
        assert set(v.router_params()) == ROUTER_PARAMS.get(model_type, {"weight"})
        assert all(id(t) in params for t in v.router_params().values())
        assert (v.shared is not None) == (family.shared is not None)
        assert (v.shared_gate is not None) == (model_type == "qwen2_moe")
        assert v.num_experts == family.num_experts(model.config) == 6
        assert v.experts.hidden_size == 40
        assert v.experts.intermediate_size == family.width(model.config)
        assert (v.experts.gate_up_proj_bias is not None) == family.bias


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_view_routes_and_dispatches_like_the_block(model_type):
    """route() is the family's router; dispatch over view.experts equals the family's experts module."""
    model = tiny_model(model_type)
    v = mh.view(model)[0]
    x = torch.randn(13, 40, generator=torch.Generator().manual_seed(0))
    routing = v.route(x)
    logits, weights, indices = v.router(x)
    assert torch.equal(routing.weights, weights) and torch.equal(routing.indices, indices)
    assert routing.k == v.k and routing.probs.shape == logits.shape
    expected = v.experts.module(x, indices, weights)
    got = dispatch(x, plan_dispatch(routing, v.num_experts), v.experts, impl="loop")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_dense_layer_rules():
    qwen = tiny_model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [v.layer for v in mh.view(qwen)] == [1]
    deepseek = tiny_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=2)
    assert [v.layer for v in mh.view(deepseek)] == [2, 3]


def test_unknown_architecture_lists_supported_families():
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50))
    with pytest.raises(UnknownNameError, match="model_type='llama'") as err:
        mh.view(llama)
    assert all(t in str(err.value) for t in FAMILY_TYPES)
    assert isinstance(err.value, MoekitError)


def test_not_a_transformers_model():
    with pytest.raises(ConfigError, match="Linear: expected a transformers model"):
        mh.view(torch.nn.Linear(2, 2))


def test_dense_model_of_a_known_family_is_refused():
    with pytest.raises(ConfigError, match="num_experts=0 gives a dense Qwen2-MoE model"):
        mh.family_of(tiny_config("qwen2_moe", num_experts=0))


def test_import_patches_nothing():
    """Importing moekit.hf does not even import transformers; accelerate is the only thing that changes a model."""
    import subprocess
    import sys

    code = "import sys, moekit.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_view_of_a_base_model():
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_config(tiny_config("olmoe"))
    assert [v.layer for v in mh.view(base)] == [0, 1]
    x = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        expected = base(x).last_hidden_state
        mh.accelerate(base)
        torch.testing.assert_close(base(x).last_hidden_state, expected, atol=1e-5, rtol=0)
