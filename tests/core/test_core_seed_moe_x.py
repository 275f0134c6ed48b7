"""MoE-X: ReLU experts against a per-token reference, the Gaussian sparsity estimate against the exact count, and
routing that sends tokens to the sparsest experts."""

import pytest
import torch

from moekit import MoE
from moekit.core.catalog.moe_x import exact_active_fraction, expected_active_fraction
from moekit.errors import ConfigError


def _layer(estimate="gaussian", seed=0, experts=6, width=128, hidden=16):
    torch.manual_seed(seed)
    moe = MoE(hidden, width, experts, k=2, router="moe_x", router_options={"estimate": estimate})
    with torch.no_grad():  # experts of different sparsity: a per-expert shift of the encoder bias
        moe.experts.b_enc.add_(torch.linspace(-0.6, 0.6, experts).unsqueeze(1))
        moe.experts.enc.add_(0.1 * torch.randn(experts, 1, hidden))  # and of the mean encoder row
    return moe


def test_output_and_active_counts_match_a_per_token_reference():
    moe = _layer()
    x = torch.randn(20, 16)
    with torch.no_grad():
        out = moe(x)
    r, ex = out.routing, moe.experts
    want = torch.zeros(20, 16, dtype=torch.float64)
    active = torch.zeros(20)
    for t in range(20):
        for j in range(2):
            e = int(r.indices[t, j])
            h = torch.relu(ex.enc[e].double() @ x[t].double() + ex.b_enc[e].double())
            want[t] += float(r.weights[t, j]) * (ex.dec[e].double() @ h)
            active[t] += float((h > 0).sum())
    torch.testing.assert_close(out.hidden.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.aux["active"], active)


def test_gaussian_estimate_tracks_the_exact_active_fraction():
    moe = _layer(width=256)
    x = torch.randn(200, 16)
    with torch.no_grad():
        est, exact = expected_active_fraction(x, moe.experts), exact_active_fraction(x, moe.experts)
    assert float((est - exact).abs().mean()) < 0.05
    # the expert ranking per token agrees: the estimate's sparsest expert is among the two sparsest in fact
    best = est.argmin(-1)
    two = exact.topk(2, dim=-1, largest=False).indices
    assert (two == best.unsqueeze(-1)).any(-1).float().mean() > 0.9


@pytest.mark.parametrize("estimate", ["exact", "gaussian"])
def test_tokens_go_to_their_sparsest_experts(estimate):
    moe = _layer(estimate)
    x = torch.randn(100, 16)
    with torch.no_grad():
        r = moe(x).routing
        exact = exact_active_fraction(x, moe.experts)
    chosen = exact.gather(1, r.indices)
    if estimate == "exact":
        torch.testing.assert_close(chosen, exact.topk(2, dim=-1, largest=False).values)
    unchosen = exact.scatter(1, r.indices, float("nan"))
    assert float(chosen.mean()) < float(unchosen.nanmean()) - 0.1


def test_routing_trains_through_the_encoders_and_bad_options():
    moe = _layer()
    out = moe(torch.randn(8, 16))
    out.hidden.square().sum().backward()
    assert moe.experts.enc.grad.abs().sum() > 0 and moe.experts.b_enc.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="temperature"):
        MoE(8, 8, 4, router="moe_x", router_options={"temperature": 0})
    with pytest.raises(ConfigError, match="estimate"):
        MoE(8, 8, 4, router="moe_x", router_options={"estimate": "l1"})
    with pytest.raises(ConfigError, match="bias"):
        MoE(8, 8, 4, router="moe_x", bias=True)
