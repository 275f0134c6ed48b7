"""Union of Experts: the decomposition is exact (dense MLP = sum of its experts, dense attention = sum of its
heads), the two-level routing processes only the selected tokens with their chosen experts, and everything trains."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.core.attention import AttentionExpertsConfig, MixtureOfAttention
from moekit.core.union import UnionOfExperts, UoEConfig, decompose_attention, decompose_mlp
from moekit.errors import ConfigError
from reference import ref_moe


@pytest.mark.parametrize("gated", [False, True])
def test_the_dense_mlp_is_the_sum_of_its_experts(gated):
    torch.manual_seed(0)
    h, width = 8, 24
    up, down = torch.randn(width, h), torch.randn(h, width)
    gate = torch.randn(width, h) if gated else None
    x = torch.randn(5, h)
    dense = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T if gated else F.gelu(x @ up.T) @ down.T
    experts = decompose_mlp(up, down, 4, "swiglu" if gated else "gelu", gate)
    total = sum(experts.expert(x, e) for e in range(4))
    torch.testing.assert_close(total, dense, atol=1e-5, rtol=1e-5)


def test_dense_attention_is_the_sum_of_its_heads():
    torch.manual_seed(1)
    b, t, h, heads = 2, 5, 8, 4
    d = h // heads
    q, k, v = (torch.randn(heads * d, h) for _ in range(3))
    o = torch.randn(h, heads * d)
    x = torch.randn(b, t, h)
    split = lambda m: (x @ m.T).view(b, t, heads, d).transpose(1, 2)  # noqa: E731
    att = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    dense = att.transpose(1, 2).reshape(b, t, heads * d) @ o.T
    moa = MixtureOfAttention(AttentionExpertsConfig(h, heads, heads, head_dim=d, shared_kv=False))
    decompose_attention(moa, q, k, v, o)
    uniform = moa.route(x)
    uniform.weights = torch.ones_like(uniform.weights)
    with torch.no_grad():
        torch.testing.assert_close(moa(x, routing=uniform).hidden, dense, atol=1e-5, rtol=1e-5)


def test_uniform_full_selection_is_the_dense_block():
    torch.manual_seed(2)
    uoe = UnionOfExperts(UoEConfig(8, 4, k=2, intermediate_size=16, data_fraction=1.0))
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        y, _ = uoe(x, uniform=True)
        flat = x.reshape(-1, 8)
        dense = sum(uoe.experts.expert(flat, e) for e in range(4)).view_as(x)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_only_selected_tokens_are_processed_by_their_chosen_experts(kind):
    torch.manual_seed(3)
    uoe = UnionOfExperts(UoEConfig(8, 4, k=2, kind=kind, intermediate_size=16, data_fraction=0.4))
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        y, r = uoe(x)
    selected = r.aux["selected"]
    assert selected.sum(1).tolist() == [math.ceil(0.4 * 10)] * 3
    assert (y[~selected] == 0).all() and (y[selected].abs().sum(-1) > 0).all()
    g = r.aux["gate"]
    # the kept tokens are each sequence's best by the selector
    for s in range(3):
        assert g[s][selected[s]].min() >= g[s][~selected[s]].max()
    if kind == "mlp":
        want = ref_moe(x.reshape(-1, 8), r.indices, r.weights.double(), uoe.experts, mask=r.mask)
        torch.testing.assert_close(y.reshape(-1, 8).double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.weights.sum(-1), (g * selected).reshape(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_sequence_level_expert_selection_shares_one_choice_per_sequence(kind):
    torch.manual_seed(5)
    uoe = UnionOfExperts(UoEConfig(8, 4, k=2, kind=kind, intermediate_size=16, data_fraction=1.0,
                                   expert_level="sequence"))
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        y, r = uoe(x)
    idx = r.indices.view(3, 7, 2)
    assert (idx == idx[:, :1]).all()  # every token of a sequence uses its sequence's two experts
    want = uoe.router(x.mean(1)).topk(2, dim=-1).indices
    assert torch.equal(idx[:, 0].sort(-1).values, want.sort(-1).values)
    if kind == "mlp":
        torch.testing.assert_close(y.reshape(-1, 8).double(),
                                   ref_moe(x.reshape(-1, 8), r.indices, r.weights.double(), uoe.experts, mask=r.mask),
                                   atol=1e-5, rtol=1e-5)


def test_selector_and_router_train_and_bad_config():
    torch.manual_seed(4)
    uoe = UnionOfExperts(UoEConfig(8, 4, k=2, intermediate_size=16))
    y, _ = uoe(torch.randn(2, 6, 8))
    y.square().sum().backward()
    assert uoe.selector.weight.grad.abs().sum() > 0 and uoe.router.weight.grad.abs().sum() > 0
    for kwargs, name in (({"num_experts": 0}, "num_experts"), ({"k": 5}, "k="), ({"data_fraction": 0}, "data_fraction"),
                         ({"kind": "conv"}, "kind"), ({"intermediate_size": 10}, "intermediate_size"),
                         ({"expert_level": "batch"}, "expert_level")):
        with pytest.raises(ConfigError, match=name):
            UnionOfExperts(UoEConfig(**{"hidden_size": 8, "num_experts": 4, "intermediate_size": 16, **kwargs}))
    with pytest.raises(ConfigError, match="divisor"):
        decompose_mlp(torch.randn(10, 4), torch.randn(4, 10), 3)
