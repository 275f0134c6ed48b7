"""TLC: opinions from evidence, Dempster's rule on a hand-computed case, the evidential loss against torch's
Dirichlet KL, and dynamic engagement (uncertain samples, and on long-tailed digits the tail classes, engage more
experts)."""

import pytest
import torch
from torch import nn

from moekit.bench.seed_tasks import MLP, digits_long_tailed
from moekit.core.tlc import Opinion, TLCClassifier, TLCConfig, combine, evidential_loss, opinion
from moekit.errors import ConfigError


def test_opinion_from_evidence():
    o = opinion(torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64))
    e = torch.nn.functional.softplus(torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64))
    s = e.sum() + 3
    torch.testing.assert_close(o.belief[0], e / s)
    torch.testing.assert_close(o.uncertainty[0], 3 / s)
    torch.testing.assert_close(o.belief.sum(-1) + o.uncertainty, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(o.alpha()[0], e + 1)


def test_dempster_rule_on_a_hand_computed_case():
    a = Opinion(torch.tensor([[0.6, 0.1]], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64))
    b = Opinion(torch.tensor([[0.2, 0.5]], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64))
    c = combine(a, b)  # conflict 0.6 * 0.5 + 0.1 * 0.2 = 0.32
    torch.testing.assert_close(c.belief, torch.tensor([[0.36 / 0.68, 0.23 / 0.68]], dtype=torch.float64))
    torch.testing.assert_close(c.uncertainty, torch.tensor([0.09 / 0.68], dtype=torch.float64))
    swapped = combine(b, a)
    torch.testing.assert_close(swapped.belief, c.belief)
    vacuous = Opinion(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    same = combine(a, vacuous)  # an expert with no evidence changes nothing
    torch.testing.assert_close(same.belief, a.belief)
    torch.testing.assert_close(same.uncertainty, a.uncertainty)


def test_evidential_loss_against_the_closed_forms():
    alpha = torch.tensor([[2.0, 1.0], [1.5, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    # row 0: ce = digamma(3) - digamma(2) = 1/2, alpha~ = (1, 1): no KL. row 1: KL(Dir(1, 4) || Dir(1, 1))
    ce1 = torch.digamma(torch.tensor(5.5, dtype=torch.float64)) - torch.digamma(torch.tensor(1.5, dtype=torch.float64))
    dirichlet = torch.distributions.Dirichlet
    kl1 = torch.distributions.kl_divergence(dirichlet(torch.tensor([1.0, 4.0], dtype=torch.float64)),
                                            dirichlet(torch.ones(2, dtype=torch.float64)))
    want = (0.5 + ce1 + 0.7 * kl1) / 2
    torch.testing.assert_close(evidential_loss(alpha, labels, 0.7), want)


class Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.rows = logits, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.logits[x[:, 0].long()]


def test_only_uncertain_samples_engage_more_experts():
    confident = torch.tensor([[20.0, -20.0], [0.0, 0.0]])  # sample 0: strong evidence; sample 1: none
    first, second = Fixed(confident), Fixed(torch.tensor([[0.0, 0.0], [0.0, 30.0]]))
    tlc = TLCClassifier([first, second], TLCConfig(threshold=0.2))
    pred, engaged, u = tlc.predict(torch.tensor([[0.0], [1.0]]))
    assert engaged.tolist() == [1, 2] and second.rows == 1  # the second expert ran on the uncertain sample only
    assert pred.tolist() == [0, 1] and (u < 0.2).all()


@pytest.mark.slow
def test_on_long_tailed_digits_tail_classes_engage_more_experts():
    torch.manual_seed(0)
    data = digits_long_tailed(0.05)
    tlc = TLCClassifier([MLP(64, 32, 10) for _ in range(3)], TLCConfig(threshold=0.3, anneal_steps=100))
    opt = torch.optim.Adam(tlc.parameters(), lr=5e-3)
    for step in range(300):
        opt.zero_grad()
        tlc.loss(data.x_train, data.y_train, step).backward()
        opt.step()
    pred, engaged, u = tlc.predict(data.x_test)
    # measured: 1.66 experts per head-class sample (classes 0-2), 2.71 per tail-class one (7-9); accuracy 0.81
    head, tail = data.y_test <= 2, data.y_test >= 7
    assert engaged[tail].float().mean() > engaged[head].float().mean() + 0.3
    assert u[tail].mean() > u[head].mean()
    assert (pred == data.y_test).float().mean() > 0.7


def test_bad_config():
    with pytest.raises(ConfigError, match="threshold"):
        TLCClassifier([nn.Linear(2, 2)], TLCConfig(threshold=0))
    with pytest.raises(ConfigError, match="anneal_steps"):
        TLCClassifier([nn.Linear(2, 2)], TLCConfig(anneal_steps=0))
    with pytest.raises(ConfigError, match="experts"):
        TLCClassifier([])
