from __future__ import annotations

import pytest
import torch

from moekit.adapt.continual import mlp
from moekit.adapt.domain import Aggregator, GlobalLocal, MetaDMoE, shifted_digits
from moekit.errors import ConfigError


def test_shifted_digits_shift_and_fill():
    x0 = shifted_digits(seed=0)[0].view(-1, 8, 8)
    x1 = shifted_digits(dx=2, dy=1, seed=0)[0].view(-1, 8, 8)
    torch.testing.assert_close(x1[:, 1:, 2:], x0[:, :-1, :-2])
    assert (x1[:, :1] == 0).all() and (x1[:, :, :2] == 0).all()
    with pytest.raises(ConfigError, match="dx"):
        shifted_digits(dx=9)


def test_gate_sends_user_inputs_to_the_local_expert():
    torch.manual_seed(0)
    ge = mlp(64, 16, 10)
    gl = GlobalLocal(ge)
    xg, yg = shifted_digits(seed=0)[:2]
    xu, yu = shifted_digits(dx=3, contrast=0.5, seed=0)[:2]
    gl.fit_local(xu[:100], yu[:100], xg[:100], epochs=30)
    with torch.no_grad():
        to_local_user = (gl.gn(xu[100:300]).argmax(-1) == 1).float().mean()
        to_local_generic = (gl.gn(xg[100:300]).argmax(-1) == 1).float().mean()
        pred = gl.predict(xu[100:300])
    assert to_local_user > 0.9 and to_local_generic < 0.1
    assert (pred == gl.le(xu[100:300]).argmax(-1)).float().mean() > 0.9
    assert all(not p.requires_grad for p in ge.parameters())
    mlp_16 = 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # GE and LE alike here; GN is linear 64 -> 2
    assert gl.overhead() == (mlp_16 + 64 * 2 + 2) / mlp_16


def test_aggregator_ignores_the_dropped_teacher_and_adapt_distils_a_copy():
    torch.manual_seed(0)
    agg = Aggregator(10)
    logits = torch.randn(5, 3, 10)
    other = logits.clone()
    other[:, 1] = torch.randn(5, 10) * 100
    torch.testing.assert_close(agg(logits, drop=1), agg(other, drop=1))
    assert not torch.allclose(agg(logits), agg(other))
    model = MetaDMoE([mlp(64, 8, 10) for _ in range(3)], agg, mlp(64, 8, 10))
    before = [p.detach().clone() for p in model.student.parameters()]
    x = torch.randn(16, 64)
    target = torch.softmax(agg(model.teacher_logits(x)) / 2, -1).detach()

    def kl(net):
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(torch.log_softmax(net(x) / 2, -1), target, reduction="batchmean"))

    adapted = model.adapt(x, steps=30, lr=1e-2)
    assert kl(adapted) < kl(model.student)
    assert all(torch.equal(a, b) for a, b in zip(before, model.student.parameters(), strict=True))
    with pytest.raises(ConfigError, match="steps"):
        model.adapt(x, steps=0)
