"""BAM: attention as a soft mixture of the branches' attentions (checked by hand, with and without shared K/V),
untrained branches give back the dense model, and the mixture trains."""

from __future__ import annotations

import pytest
import torch
from make_families import dense_model, perturbed_branches

from moekit.errors import ConfigError
from moekit.make.bam import MixtureOfAttention, bam, mix_attention
from moekit.make.btx import mix
from moekit.make.finetune import Finetune, finetune_model


@pytest.mark.parametrize("model_type", ["qwen3", "deepseek_v3"])
def test_untrained_branches_give_back_the_dense_model(model_type):
    model = dense_model(model_type)
    ids = torch.randint(0, 100, (2, 9))
    for share_kv in (False, True):
        moe, plan = bam(model, [torch.randint(0, 100, (60,))] * 2, k=2, settings=Finetune(steps=0),
                        router="random", share_kv=share_kv, progress=False)
        assert plan["partition"] == "bam" and isinstance(moe.model.layers[0].self_attn, MixtureOfAttention)
        with torch.no_grad():
            assert torch.allclose(moe(ids).logits, model(ids, use_cache=False).logits, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3", "deepseek_v3"])
def test_soft_mixture_of_the_branches_attentions(model_type):
    model = dense_model(model_type)
    branches = perturbed_branches(model, seed=20)
    moe, _ = mix(branches, k=2, router="random")
    mix_attention(moe, branches)
    layer = moe.model.layers[1]
    with torch.no_grad():
        layer.self_attn.router.weight.normal_(0, 0.5)
    captured = {}
    handle = layer.self_attn.register_forward_hook(
        lambda _m, _args, kwargs, out: captured.update(kwargs=kwargs, out=out[0]), with_kwargs=True)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        moe(ids)
        handle.remove()
        kw = dict(captured["kwargs"])
        x = kw.pop("hidden_states")
        kw["past_key_values"] = None
        p = torch.softmax(x @ layer.self_attn.router.weight.t(), -1)
        want = sum(p[..., d:d + 1] * branches[d].model.layers[1].self_attn(x, **kw)[0] for d in range(2))
    assert torch.allclose(captured["out"], want, atol=1e-5)


def test_shared_kv_is_one_module_holding_the_average():
    model = dense_model("qwen3")
    branches = perturbed_branches(model, seed=20)
    moe, _ = mix(branches, k=2, router="random")
    mix_attention(moe, branches, share_kv=True)
    experts = moe.model.layers[0].self_attn.experts
    assert experts[0].k_proj is experts[1].k_proj and experts[0].v_proj is experts[1].v_proj
    assert experts[0].q_proj is not experts[1].q_proj
    mean = (branches[0].model.layers[0].self_attn.k_proj.weight + branches[1].model.layers[0].self_attn.k_proj.weight)
    assert torch.allclose(experts[0].k_proj.weight, mean / 2, atol=1e-7)
    n_shared = sum(p.numel() for p in moe.parameters())
    moe2, _ = mix(branches, k=2, router="random")
    mix_attention(moe2, branches)
    assert n_shared < sum(p.numel() for p in moe2.parameters())


def test_the_mixture_trains_and_refusals():
    """With branches that differ (with identical ones the router's gradient is exactly zero: softmax weights of
    equal outputs), the attention router learns along with the rest."""
    model = dense_model("qwen3", vocab=300)
    branches = perturbed_branches(model, seed=20)
    moe, _ = mix(branches, k=1, router="random")
    mix_attention(moe, branches)
    tokens = torch.randint(0, 300, (33,), generator=torch.Generator().manual_seed(0))
    records = finetune_model(moe, tokens, Finetune(steps=12, lr=3e-3, warmup=1, batch_size=2, seq_len=32),
                             progress=False)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert float(moe.model.layers[0].self_attn.router.weight.detach().abs().max()) > 0  # the router learned
    with pytest.raises(ConfigError, match="expected at least 2 copies"):
        mix_attention(moe, [model])
