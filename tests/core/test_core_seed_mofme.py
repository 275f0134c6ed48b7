"""MoFME's feature-modulated experts with the authors' linear modulation: the routed layer against a per-token
computation of E_e(x) = W_down((S_e a + gamma_e) * a + H_e a + beta_e), a = act(W_up x)."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE
from moekit.errors import ConfigError


def test_linear_modulation_matches_the_per_token_formula():
    torch.manual_seed(0)
    moe = MoE(12, 8, 4, k=2, router="film", router_options={"modulation": "linear"}).eval()
    ex = moe.experts
    with torch.no_grad():
        for p in (ex.scale_proj, ex.shift_proj, ex.gamma, ex.beta):
            p.copy_(0.3 * torch.randn_like(p))
    x = torch.randn(9, 12)
    with torch.no_grad():
        out = moe(x)
    r = out.routing
    want = torch.zeros(9, 12, dtype=torch.float64)
    gu, dn = ex.gate_up_proj.double(), ex.down_proj.double()
    for t in range(9):
        h = gu @ x[t].double()
        a = F.silu(h[:8]) * h[8:]
        for j in range(2):
            e = int(r.indices[t, j])
            m = (ex.scale_proj[e].double() @ a + ex.gamma[e].double()) * a + ex.shift_proj[e].double() @ a \
                + ex.beta[e].double()
            want[t] += float(r.weights[t, j]) * (dn @ m)
    torch.testing.assert_close(out.hidden.double(), want, atol=1e-5, rtol=1e-5)
    for e in range(4):  # the single-expert path agrees
        torch.testing.assert_close(ex.expert(x[:3], e).double(),
                                   torch.stack([dn @ ((ex.scale_proj[e].double() @ a + ex.gamma[e].double()) * a
                                                      + ex.shift_proj[e].double() @ a + ex.beta[e].double())
                                                for a in (F.silu((gu @ xt.double())[:8]) * (gu @ xt.double())[8:]
                                                          for xt in x[:3])]), atol=1e-5, rtol=1e-5)


def test_linear_modulation_starts_as_the_vector_one_and_trains():
    torch.manual_seed(1)
    vec = MoE(12, 8, 4, k=2, router="film")
    lin = MoE(12, 8, 4, k=2, router="film", router_options={"modulation": "linear"})
    lin.load_state_dict(vec.state_dict(), strict=False)
    x = torch.randn(6, 12)
    torch.testing.assert_close(lin(x).hidden, vec(x).hidden)
    lin(x).hidden.square().sum().backward()
    assert lin.experts.scale_proj.grad.abs().sum() > 0 and lin.experts.shift_proj.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="modulation"):
        MoE(12, 8, 4, router="film", router_options={"modulation": "conv"})


def test_uncertainty_aware_routing_on_a_hand_computed_case():
    """Two router heads on x = (1, 0): head 0 scores the 3 experts (2, 0, 1), head 1 (0, 0, 1). Mean (1, 0, 1),
    variance (1, 0, 0), calibrated logits mu / sqrt(1 + pi var / 8) = (1 / sqrt(1 + pi / 8), 0, 1) = (0.8476, 0, 1):
    the heads' disagreement on expert 0 pulls it below expert 2, so top-1 picks expert 2 (the plain mean ties them),
    and top-2 weights are softmax over (1, 0.8476) = (0.5380, 0.4620)."""
    moe = MoE(2, 4, 3, k=2, router="film", router_options={"heads": 2}).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0],     # head 0, experts 0..2
                                              [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))   # head 1
    x = torch.tensor([[1.0, 0.0]])
    c = 1 / (1 + torch.pi / 8) ** 0.5
    torch.testing.assert_close(moe.router.logits(x), torch.tensor([[c, 0.0, 1.0]]))
    r = moe.router(x, 2)
    assert r.indices.tolist() == [[2, 0]]
    w2 = 1 / (1 + torch.exp(torch.tensor(c - 1.0)))
    torch.testing.assert_close(r.weights, torch.tensor([[w2, 1 - w2]]))
    assert abs(float(w2) - 0.5380) < 1e-4
    assert moe.router(x, 1).indices.tolist() == [[2]]
