"""MDCS: the diversity loss is per-expert logit adjustment (hand-checked) and makes experts lean to different
parts of a long-tailed label distribution; consistency self-distillation counts only confidently classified
samples."""

import pytest
import torch
import torch.nn.functional as F

from moekit.bench.seed_tasks import MLP, digits_long_tailed
from moekit.errors import ConfigError
from moekit.train.mdcs import (
    MDCSConfig,
    augment,
    class_prior,
    consistency_loss,
    diversity_loss,
    expert_lambdas,
    mdcs_loss,
)


def test_diversity_loss_is_each_experts_logit_adjusted_cross_entropy():
    torch.manual_seed(0)
    z = [torch.randn(5, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0, 0])
    prior = torch.tensor([0.6, 0.3, 0.1])
    cfg = MDCSConfig(tau=0.5)
    assert expert_lambdas(3, -0.5, 2.5) == [-0.5, 1.0, 2.5]  # the authors' code's three experts
    lams = [-0.5, 1.0, 2.5]
    want = sum(F.cross_entropy((zi + lam * prior.log()) / 0.5, y) for zi, lam in zip(z, lams, strict=True)) / 3
    torch.testing.assert_close(diversity_loss(z, y, prior, cfg), want)


def test_consistency_counts_each_experts_confident_samples_only():
    # expert 0 gets sample 0 right only, expert 1 sample 1 only
    weak = [torch.tensor([[3.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])]
    strong = [torch.tensor([[1.0, 1.0], [0.0, 5.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])]
    y = torch.tensor([0, 1])
    t = 2.0

    def kl(w, s):
        p, q = torch.softmax(w / t, -1), torch.softmax(s / t, -1)
        return t * t * (p * (p.log() - q.log())).sum()

    want = (kl(weak[0][0], strong[0][0]) + kl(weak[1][1], strong[1][1])) / 2
    torch.testing.assert_close(consistency_loss(weak, strong, y, t), want)
    nobody = consistency_loss(weak[:1], strong[:1], torch.tensor([1, 1]), t)
    assert float(nobody) == 0 and nobody.shape == ()


@pytest.mark.slow
def test_diversity_makes_the_experts_lean_to_head_and_tail():
    """On long-tailed digits (tail / head = 0.05) the lambda = -0.5 expert recalls head classes better and the
    lambda = 2.5 expert tail classes better."""
    torch.manual_seed(0)
    data = digits_long_tailed(0.05)
    prior = class_prior(data.y_train, 10)
    experts = [MLP(64, 32, 10) for _ in range(3)]
    opt = torch.optim.Adam([p for e in experts for p in e.parameters()], lr=5e-3)
    g = torch.Generator().manual_seed(0)
    cfg = MDCSConfig()
    for _ in range(300):
        weak = [e(augment(data.x_train, False, g)) for e in experts]
        strong = [e(augment(data.x_train, True, g)) for e in experts]
        loss, parts = mdcs_loss(weak, strong, data.y_train, prior, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        preds = [e(data.x_test).argmax(-1) for e in experts]
    head, tail = data.y_test <= 2, data.y_test >= 7

    def recall(p, mask):
        return float((p == data.y_test)[mask].float().mean())

    assert recall(preds[2], tail) > recall(preds[0], tail) + 0.1
    assert recall(preds[0], head) >= recall(preds[2], head)
    assert float(parts["consistency"].detach()) > 0


def test_bad_config_and_prior():
    with pytest.raises(ConfigError, match="cs_weight"):
        MDCSConfig(cs_weight=-1.0).check()
    with pytest.raises(ConfigError, match="temperature"):
        MDCSConfig(temperature=0).check()
    with pytest.raises(ConfigError, match="lambda_min"):
        MDCSConfig(lambda_min=3.0).check()
    with pytest.raises(ConfigError, match="class 2"):
        class_prior(torch.tensor([0, 1, 3]), 4)
