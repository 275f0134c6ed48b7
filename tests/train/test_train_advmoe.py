"""AdvMoE: PGD stays in its ball and raises the loss; router and expert steps each move only their own
parameters, in alternation; the baseline moves all."""

import pytest
import torch
import torch.nn.functional as F

from moekit.bench.seed_tasks import MoENet, digits_long_tailed
from moekit.errors import ConfigError
from moekit.train.advmoe import (
    AdvMoETrainer,
    PGDConfig,
    TradesAdvMoE,
    pgd_attack,
    split_parameters,
    trades_attack,
    vanilla_at_step,
)


def _data():
    d = digits_long_tailed(1.0)
    return d.x_train[:256], d.y_train[:256]


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    x, y = _data()
    model = MoENet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    model.zero_grad(set_to_none=True)
    adv = pgd_attack(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.1
    assert all(p.grad is None for p in model.parameters())  # the attack takes gradients of the input only
    noise = (x + (torch.rand(x.shape) * 2 - 1) * 0.1).clamp(0, 1)
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(noise), y)


def test_router_and_expert_steps_alternate_and_touch_only_their_parameters():
    torch.manual_seed(1)
    x, y = _data()
    model = MoENet()
    routers, rest = split_parameters(model)
    assert [p.shape for p in routers] == [model.moe.router.weight.shape]
    trainer = AdvMoETrainer(model, PGDConfig(steps=2))
    phases = []
    for _ in range(2):
        before_r = [p.detach().clone() for p in routers]
        before_e = [p.detach().clone() for p in rest]
        phase, _ = trainer.step(x, y)
        phases.append(phase)
        moved_r = any(not torch.equal(a, b) for a, b in zip(before_r, routers, strict=True))
        moved_e = any(not torch.equal(a, b) for a, b in zip(before_e, rest, strict=True))
        assert (moved_r, moved_e) == ((True, False) if phase == "router" else (False, True))
    assert phases == ["router", "experts"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    vanilla_at_step(model, opt, x, y, PGDConfig(steps=2))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_values():
    with pytest.raises(ConfigError, match="eps"):
        PGDConfig(eps=-0.1).check()
    with pytest.raises(ConfigError, match="router"):
        split_parameters(torch.nn.Linear(2, 2))
    model = MoENet()
    trainer = AdvMoETrainer(model, schedule=lambda _: "both")
    x, y = _data()
    with pytest.raises(ConfigError, match="schedule"):
        trainer.step(x[:8], y[:8])


def test_trades_attack_stays_in_the_ball_and_raises_its_objective():
    torch.manual_seed(2)
    x, _ = _data()
    model = MoENet(experts=4, k=2)
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    adv = trades_attack(model, model.router_logits, x, cfg, torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1

    def objective(z):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(model(z), -1), F.softmax(model(x), -1), reduction="sum")
                         + F.kl_div(F.log_softmax(model.router_logits(z), -1),
                                    F.softmax(model.router_logits(x), -1), reduction="sum"))

    noise = (x + (torch.rand(x.shape) * 2 - 1) * 0.1).clamp(0, 1)
    assert objective(adv) > 2 * objective(noise)


def test_trades_advmoe_supervises_the_router_with_the_class_modulo_experts():
    """The authors' router step: after training, the router sends each class c to expert c mod E."""
    torch.manual_seed(3)
    x, y = _data()
    model = MoENet(experts=4, k=2)
    trainer = TradesAdvMoE(model, model.router_logits, 4, PGDConfig(steps=2), lr=1e-2)
    for _ in range(60):
        parts = trainer.step(x, y)
    with torch.no_grad():
        routed = model.router_logits(x).argmax(-1)
    assert float((routed == y % 4).float().mean()) > 0.8
    assert set(parts) == {"expert_loss", "router_loss"}
    with pytest.raises(ConfigError, match="beta"):
        TradesAdvMoE(model, model.router_logits, 4, beta=-1.0)
