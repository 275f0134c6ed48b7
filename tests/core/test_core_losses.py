import math

import pytest
import torch

from moekit import MoE
from moekit.core.losses import seq_balance_loss, switch_balance_loss, update_correction_bias, z_loss
from moekit.core.routing import Routing, softmax_topk
from moekit.errors import ShapeError


def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    r = softmax_topk(probs.log(), 1)
    # top-1: experts [0, 0, 1] -> f = [2/3, 1/3]; P = [1.9/3, 1.1/3]; E * sum f P
    expected = 2 * (2 / 3 * 1.9 / 3 + 1 / 3 * 1.1 / 3)
    assert float(switch_balance_loss(r)) == pytest.approx(expected, rel=1e-6)


def test_switch_loss_is_k_when_balanced():
    # uniform router, each expert chosen equally often -> E * sum (k/E)(1/E) = k
    logits = torch.zeros(4, 4)
    r = Routing(logits, torch.full((4, 2), 0.5), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
    assert float(switch_balance_loss(r)) == pytest.approx(2.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2 and ln 4
    assert float(z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)


def test_seq_balance_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    r = Routing(probs.log(), torch.ones(4, 1), torch.tensor([[0], [0], [1], [0]]), probs=probs)
    # seq 1: f = 2/(1*2) * [2, 0] = [2, 0], P = [0.75, 0.25] -> 1.5
    # seq 2: f = [1, 1], P = [0.45, 0.55] -> 1.0
    assert float(seq_balance_loss(r, 2)) == pytest.approx((1.5 + 1.0) / 2, rel=1e-6)
    with pytest.raises(ShapeError, match="seq_len=3"):
        seq_balance_loss(r, 3)


def test_update_correction_bias_hand_computed():
    bias = torch.zeros(3)
    update_correction_bias(bias, torch.tensor([3, 1, 2]), 0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0]))


def cv(counts):
    c = counts.float()
    return float(c.std(unbiased=False) / c.mean())


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, k=2, router="deepseek_v3")
    x = torch.randn(512, 16) + 1.0
    with torch.no_grad():  # skew: experts 0 and 1 win for most tokens
        moe.router.weight[:2] += 0.15
    before = cv(moe(x).expert_counts)
    for _ in range(200):
        with torch.no_grad():
            moe.update_bias(moe(x).expert_counts, gamma=0.01)
    after = cv(moe(x).expert_counts)
    assert before > 1.0 and after < 0.3 * before


def test_balance_loss_gradient_evens_load():
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, k=2, router="topk")
    x = torch.randn(512, 16) + 1.0
    with torch.no_grad():
        moe.router.weight[:2] += 0.15
    before = cv(moe(x).expert_counts)
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    for _ in range(150):
        opt.zero_grad()
        switch_balance_loss(moe(x).routing).backward()
        opt.step()
    assert cv(moe(x).expert_counts) < 0.5 * before


def test_layer_aux_loss_combines_weighted_components():
    torch.manual_seed(0)
    from moekit.core.layer import LossWeights

    moe = MoE(8, 4, 4, k=2, loss_weights=LossWeights(balance=0.1, z=0.01, seq=0.5))
    out = moe(torch.randn(3, 5, 8))
    ls = out.losses
    torch.testing.assert_close(out.aux_loss, 0.1 * ls["balance"] + 0.01 * ls["z"] + 0.5 * ls["seq"])
    torch.testing.assert_close(ls["seq"], seq_balance_loss(out.routing, 5))
