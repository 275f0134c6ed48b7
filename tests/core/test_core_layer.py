import pytest
import torch

from moekit import MoE, MoekitError, router_names
from moekit.errors import ConfigError, RoutingError, ShapeError, UnknownNameError


def test_contract_shapes_and_names():
    moe = MoE(32, 24, 6, k=2)
    x = torch.randn(2, 3, 4, 32)
    out = moe(x)
    assert out.hidden.shape == x.shape
    assert out.routing.indices.shape == (24, 2) and out.routing.weights.shape == (24, 2)
    params = dict(moe.named_parameters())
    assert params["experts.gate_up_proj"].shape == (6, 48, 32)
    assert params["experts.down_proj"].shape == (6, 32, 24)
    assert params["router.weight"].shape == (6, 32)
    assert out.expert_counts.sum() == 48


def test_fine_grained_segmentation():
    moe = MoE(16, 32, 4, k=2, granularity=4, num_shared_experts=2)
    assert moe.num_experts == 16 and moe.k == 8
    assert moe.experts.gate_up_proj.shape == (16, 16, 16)
    assert moe.shared_experts.up_proj.weight.shape == (16, 16)  # 2 shared experts of the fine width 8
    out = moe(torch.randn(5, 16))
    assert out.routing.indices.shape == (5, 8)
    with pytest.raises(ConfigError, match="granularity=3"):
        MoE(16, 32, 4, granularity=3)


def test_shared_expert_gate_is_sigmoid_scaled():
    torch.manual_seed(0)
    moe = MoE(8, 4, 4, k=1, num_shared_experts=1, shared_gate=True)
    x = torch.randn(6, 8)
    with torch.no_grad():
        moe.shared_experts.shared_expert_gate.weight.fill_(-1e4)  # gate ~ 0: only routed experts remain
    routed = moe(x).hidden
    moe.shared_experts = None
    torch.testing.assert_close(routed, moe(x).hidden)


def test_k_override_per_call():
    moe = MoE(8, 4, 6, k=2)
    x = torch.randn(5, 8)
    assert moe(x, k=4).routing.k == 4 and moe(x).routing.k == 2
    with pytest.raises(ConfigError, match="k=7"):
        moe(x, k=7)


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        moe = MoE(16, 8, 8, k=2, router_options={"jitter": 0.1})
        moe.train()
        x = torch.randn(10, 16)
        outs.append(moe(x).hidden)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_trains_with_autograd():
    torch.manual_seed(0)
    moe = MoE(16, 16, 4, k=2)
    x = torch.randn(64, 16)
    target = torch.tanh(x @ torch.randn(16, 16))
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        out = moe(x)
        loss = torch.nn.functional.mse_loss(out.hidden, target) + out.aux_loss
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_bad_input_errors():
    moe = MoE(8, 4, 4, k=2)
    with pytest.raises(ShapeError, match=r"hidden: expected last dimension hidden_size=8, got shape \[3, 7\]"):
        moe(torch.randn(3, 7))
    with pytest.raises(ConfigError, match="k=5: expected an integer from 1 to num_experts=4"):
        MoE(8, 4, 4, k=5)
    with pytest.raises(UnknownNameError, match="router='switchy': expected one of .*topk"):
        MoE(8, 4, 4, router="switchy")
    with pytest.raises(ConfigError, match="activation='relu'"):
        MoE(8, 4, 4, activation="relu")
    with pytest.raises(ConfigError, match="hidden_size=0"):
        MoE(0, 4, 4)
    with pytest.raises(RoutingError, match="NaN"):
        moe(torch.full((2, 8), float("nan")))
    with pytest.raises(ConfigError, match="update_bias"):
        moe.update_bias(torch.ones(4))
    for err in (ShapeError, ConfigError, UnknownNameError, RoutingError):
        assert issubclass(err, MoekitError)


def test_router_registry_lists_builtin_routers():
    assert {"topk", "topk_softmax", "deepseek_v3", "deepseek_v2"} <= set(router_names())


def test_registered_research_router_plugs_into_moe_with_variable_k():
    """A router registered by name is built by MoE like the built-in ones, and a variable number of experts per
    token (padded slots, mask) goes through the fast dispatch and matches the per-token reference."""
    from moekit.core.routers import ROUTERS, Router, register_router
    from moekit.core.routing import Routing
    from reference import ref_moe

    @register_router("test_threshold")
    class ThresholdRouter(Router):
        """Keep the experts with p >= 0.2 among the top k (at least the best one)."""

        def rule(self, logits, k):
            probs = torch.softmax(logits, -1)
            weights, indices = probs.topk(k)
            mask = weights >= 0.2
            mask[:, 0] = True
            return Routing(logits, weights * mask, indices, mask=mask, probs=probs)

    try:
        with pytest.raises(ConfigError, match="already registered"):
            register_router("test_threshold")(ThresholdRouter)
        torch.manual_seed(0)
        moe = MoE(8, 4, 6, k=3, router="test_threshold")
        x = torch.randn(25, 8) * 3
        with torch.no_grad():
            out = moe(x)
        r = out.routing
        assert int(r.experts_per_token().min()) >= 1 and int(r.experts_per_token().max()) <= 3
        assert len(set(r.experts_per_token().tolist())) > 1  # the number of experts really varies
        want = ref_moe(x, r.indices, r.weights.double(), moe.experts, mask=r.mask)
        torch.testing.assert_close(out.hidden.double(), want, atol=1e-5, rtol=1e-5)
        assert out.expert_counts.sum() == int(r.mask.sum())
    finally:
        ROUTERS.pop("test_threshold")
