"""Attention experts (`moekit.core.attention`): routed heads against the per-token reference in fp32/bf16/fp64,
gradcheck in float64, stick-breaking on a hand-computed case, adding and pruning heads, bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.core.attention import AttentionExpertsConfig, MixtureOfAttention, attention_weights
from moekit.core.layer import LossWeights
from moekit.core.routing import Routing
from moekit.errors import ConfigError, MoekitError, ShapeError
from reference import ref_attention_experts

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2}


@st.composite
def setups(draw):
    heads = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["softmax", "stickbreaking"]))
    return dict(
        batch=draw(st.integers(1, 2)), seq=draw(st.integers(1, 6)), hidden=draw(st.sampled_from([4, 8, 12])),
        heads=heads, k=draw(st.integers(1, heads)), shared_kv=draw(st.booleans()), kind=kind,
        causal=True if kind == "stickbreaking" else draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])), seed=draw(st.integers(0, 99)),
        per_expert=draw(st.integers(1, 3)),
    )


@given(setups())
def test_matches_the_per_token_reference(s):
    torch.manual_seed(s["seed"])
    cfg = AttentionExpertsConfig(s["hidden"], s["heads"], s["k"], shared_kv=s["shared_kv"], kind=s["kind"],
                                 causal=s["causal"], heads_per_expert=s["per_expert"])
    moa = MixtureOfAttention(cfg, dtype=s["dtype"])
    x = torch.randn(s["batch"], s["seq"], s["hidden"]).to(s["dtype"])
    with torch.no_grad():
        out = moa(x)
    r = out.routing
    assert out.hidden.dtype == s["dtype"] and out.hidden.shape == x.shape
    want = ref_attention_experts(x, r.indices, r.weights.double(), r.mask, moa)
    tol = TOL[s["dtype"]]
    torch.testing.assert_close(out.hidden.double(), want, atol=tol, rtol=tol)


def test_chosen_heads_differ_between_tokens_and_only_they_count():
    """Zeroing a head that no token chose leaves the output; zeroing a chosen one changes it."""
    torch.manual_seed(3)
    moa = MixtureOfAttention(AttentionExpertsConfig(8, 6, 1))
    with torch.no_grad():
        moa.router.weight.mul_(5)
        x = torch.randn(2, 10, 8)
        out = moa(x)
        chosen = set(out.routing.indices.flatten().tolist())
        assert len(chosen) >= 2
        unchosen = sorted(set(range(6)) - chosen)
        if unchosen:
            moa.o_proj[unchosen[0]].zero_()
            torch.testing.assert_close(moa(x).hidden, out.hidden)
        moa.o_proj[min(chosen)].zero_()
        assert not torch.allclose(moa(x).hidden, out.hidden)


def test_stickbreaking_on_a_hand_computed_case():
    """Three keys with scores z: the nearest key takes sigmoid(z_3), the next its share of what is left."""
    z = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    a = attention_weights(z, torch.ones_like(z, dtype=torch.bool), "stickbreaking")
    sig = [1 / (1 + math.exp(-v)) for v in (0.5, -1.0, 2.0)]
    want = [sig[0] * (1 - sig[1]) * (1 - sig[2]), sig[1] * (1 - sig[2]), sig[2]]
    torch.testing.assert_close(a, torch.tensor([want], dtype=torch.float64))
    assert float(a.sum()) < 1  # the stick is never fully used
    allowed = torch.tensor([[True, True, False]])  # a causal row: the third key is in the future
    a2 = attention_weights(z, allowed, "stickbreaking")
    torch.testing.assert_close(a2, torch.tensor([[sig[0] * (1 - sig[1]), sig[1], 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["softmax", "stickbreaking"])
@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("per_expert", [1, 2])
def test_gradcheck_float64(kind, shared_kv, per_expert):
    torch.manual_seed(0)
    moa = MixtureOfAttention(AttentionExpertsConfig(6, 4, 2, shared_kv=shared_kv, kind=kind,
                                                    heads_per_expert=per_expert), dtype=torch.float64)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    params = [p.detach().clone().requires_grad_(True) for p in (moa.q_proj, moa.k_proj, moa.v_proj, moa.o_proj)]
    # through the routing weights too (the chosen heads do not move under a 1e-6 perturbation)
    assert torch.autograd.gradcheck(lambda x: moa(x).hidden, (x,), eps=1e-6, atol=1e-7)
    routing = moa.route(x.detach())
    fixed = Routing(routing.logits, routing.weights.detach(), routing.indices)

    def g(*ps):
        qkvo = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), ps, strict=True))
        for name, p in qkvo.items():
            del moa._parameters[name]
            setattr(moa, name, p)
        try:
            return moa.heads(x.detach(), fixed)
        finally:
            for name, p in qkvo.items():
                delattr(moa, name)
                moa.register_parameter(name, torch.nn.Parameter(p.detach()))

    assert torch.autograd.gradcheck(g, tuple(params), eps=1e-6, atol=1e-7)


def test_losses_and_gradients_reach_router_and_heads():
    torch.manual_seed(1)
    moa = MixtureOfAttention(AttentionExpertsConfig(8, 4, 2, loss_weights=LossWeights(balance=0.1, z=0.01)))
    out = moa(torch.randn(2, 5, 8))
    assert {"balance", "z"} <= set(out.losses)
    torch.testing.assert_close(out.aux_loss, 0.1 * out.losses["balance"] + 0.01 * out.losses["z"])
    (out.hidden.square().mean() + out.aux_loss).backward()
    for p in (moa.router.weight, moa.q_proj, moa.k_proj, moa.v_proj, moa.o_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_an_external_routing_is_used_as_given():
    torch.manual_seed(2)
    moa = MixtureOfAttention(AttentionExpertsConfig(8, 4, 2))
    x = torch.randn(1, 3, 8)
    idx = torch.tensor([[0, 3], [1, 2], [3, 0]])
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]])
    routing = Routing(torch.zeros(3, 4), w, idx, mask=torch.tensor([[True, True], [True, False], [True, True]]))
    with torch.no_grad():
        got = moa(x, routing=routing).hidden
    torch.testing.assert_close(got.double(), ref_attention_experts(x, idx, w.double(), routing.mask, moa),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="routing"):
        moa(torch.randn(1, 4, 8), routing=routing)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_added_heads_leave_old_routings_alone_and_pruned_heads_keep_the_rest(shared_kv):
    torch.manual_seed(4)
    moa = MixtureOfAttention(AttentionExpertsConfig(8, 4, 2, shared_kv=shared_kv))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = moa(x)
        moa.add_heads(2)
        assert moa.num_heads == 6 and moa.router.weight.shape == (6, 8)
        torch.testing.assert_close(moa(x, routing=before.routing).hidden, before.hidden)
        assert moa(x).routing.logits.shape[-1] == 6
        keep = [3, 1, 0]
        r = before.routing
        # a routing that uses only heads 0, 1, 3, renamed to their new positions after pruning
        idx = torch.where(r.indices == 2, torch.ones_like(r.indices), r.indices)
        ref = moa(x, routing=Routing(r.logits, r.weights, idx)).hidden
        moa.prune_heads(keep)
        renamed = torch.tensor([keep.index(int(i)) for i in idx.flatten()]).view_as(idx)
        torch.testing.assert_close(moa(x, routing=Routing(r.logits, r.weights, renamed)).hidden, ref)
        assert moa.num_heads == 3 and moa.router.num_experts == 3


@pytest.mark.parametrize("kwargs, name", [
    ({"num_heads": 0}, "num_heads"), ({"heads_per_expert": 0}, "heads_per_expert"), ({"num_heads": 2, "k": 3}, "k="),
    ({"kind": "linear"}, "kind"),
    ({"kind": "stickbreaking", "causal": False}, "causal"), ({"head_dim": 0}, "head_dim"),
    ({"loss_weights": LossWeights(balance=-0.1)}, "loss_weights.balance"),
    ({"loss_weights": LossWeights(z=float("nan"))}, "loss_weights.z"),
])
def test_bad_config_names_the_argument(kwargs, name):
    base = {"hidden_size": 8, "num_heads": 4, "k": 2}
    with pytest.raises(MoekitError, match=name):
        MixtureOfAttention(AttentionExpertsConfig(**{**base, **kwargs}))


def test_bad_input_and_bad_prune():
    moa = MixtureOfAttention(AttentionExpertsConfig(8, 4, 2))
    with pytest.raises(ShapeError, match="x: expected"):
        moa(torch.randn(3, 8))
    with pytest.raises(ConfigError, match="keep"):
        moa.prune_heads([0, 0])
    with pytest.raises(ConfigError, match="at least k"):
        moa.prune_heads([1])
    with pytest.raises(ConfigError, match="n="):
        moa.add_heads(0)


def test_experts_of_several_heads_upcycled_from_a_dense_attention_reproduce_it():
    """BAM's start: every expert a copy of a dense 4-head attention (per-expert K/V), soft routing over all of
    them (k = E, weights summing to 1): the layer is the dense attention."""
    torch.manual_seed(5)
    b, t, h, heads = 2, 5, 8, 4
    d = h // heads
    q, k, v = (torch.randn(heads * d, h) for _ in range(3))
    o = torch.randn(h, heads * d)
    x = torch.randn(b, t, h)

    def split(m):
        return (x @ m.T).view(b, t, heads, d).transpose(1, 2)

    att = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    dense = att.transpose(1, 2).reshape(b, t, heads * d) @ o.T
    moa = MixtureOfAttention(AttentionExpertsConfig(h, 3, 3, head_dim=d, heads_per_expert=heads, shared_kv=False))
    with torch.no_grad():
        for p, w in ((moa.q_proj, q), (moa.k_proj, k), (moa.v_proj, v), (moa.o_proj, o)):
            p.copy_(w.expand_as(p))
        torch.testing.assert_close(moa(x).hidden, dense, atol=1e-5, rtol=1e-5)
