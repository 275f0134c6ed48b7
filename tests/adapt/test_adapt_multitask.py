from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.adapt.multitask import MODELS, PLE, HoME, MMoE, SharedBottom, diagnostics
from moekit.adapt.multitask_tasks import diabetes_tasks, synthetic_tasks, train
from moekit.errors import ConfigError


def test_gates_route_a_planted_task_split():
    torch.manual_seed(0)
    d = 6
    x = torch.randn(512, d)
    w = torch.zeros(2, d)
    w[0, :3], w[1, 3:] = 1.0, 1.0
    ys = x @ w.T  # task 0 reads features 0-2, task 1 features 3-5
    model = MMoE(d, 2, hidden=1, experts=2)
    with torch.no_grad():  # plant: expert e computes task e's function (+10 keeps it clear of the ReLU)
        for e in range(2):
            model.experts[e].fc.weight.copy_(w[e:e + 1])
            model.experts[e].fc.bias.fill_(10.0)
            model.experts[e].fc.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for _ in range(300):
        loss = sum(torch.nn.functional.mse_loss(o[:, 0], ys[:, t]) for t, o in enumerate(model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(x)
    gates = model.last["gates"]
    assert gates[0][:, 0].mean() > 0.8 and gates[1][:, 1].mean() > 0.8


def test_hierarchy_masks_keep_each_gate_to_its_experts():
    model = HoME(5, 3, hidden=4, shared=2, specific=1, groups=[0, 0, 1], group_experts=1, feature_gates=2)
    kinds = model.owner  # shared x2, group 0, group 1, task 0, task 1, task 2
    assert kinds == [("shared", -1)] * 2 + [("group", 0), ("group", 1), ("task", 0), ("task", 1), ("task", 2)]
    assert model.gate_experts == {0: [0, 1, 2, 4], 1: [0, 1, 2, 5], 2: [0, 1, 3, 6]}
    outs = model(torch.randn(8, 5))
    assert [o.shape for o in outs] == [(8, 1)] * 3
    diag = diagnostics(model)
    assert set(diag["shared_use"]) == {0, 1, 2}
    for share in diag["shared_share"].values():
        assert abs(sum(share.values()) - 1) < 1e-6


def test_collapse_diagnostic_by_hand():
    model = SharedBottom(4, 2, hidden=3)
    with torch.no_grad():
        model.bottom.fc.bias.fill_(-1e3)  # every ReLU unit off
    model(torch.randn(16, 4))
    assert diagnostics(model)["near_zero"] == {"0": 1.0}
    home = HoME(4, 2, hidden=3).train()
    home(torch.randn(16, 4))
    assert max(diagnostics(home)["near_zero"].values()) < 0.01  # BatchNorm + Swish: no exact zeros


def test_synthetic_tasks_correlation_knob():
    def label_corr(p):
        data = synthetic_tasks(n_train=3000, n_test=10, correlation=p, seed=1)
        return np.corrcoef(data.ys_train.T.numpy())[0, 1]

    assert label_corr(1.0) > 0.99
    assert label_corr(1.0) > label_corr(0.5) > label_corr(0.0)
    a, b = synthetic_tasks(n_train=50, n_test=5, seed=3), synthetic_tasks(n_train=50, n_test=5, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.ys_test, b.ys_test)


def test_every_model_trains_on_bundled_tabular_data():
    data = diabetes_tasks()
    assert data.x_train.shape[1] == 9 and data.ys_train.shape[1] == 2
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        r = train(cls(9, 2), data, epochs=3, batch_size=64)
        assert len(r["test_mse"]) == 2 and all(np.isfinite(r["test_mse"])), name


def test_bad_multitask_arguments():
    with pytest.raises(ConfigError, match="correlation"):
        synthetic_tasks(correlation=1.5)
    with pytest.raises(ConfigError, match="groups"):
        PLE(4, 2, groups=[0])
    with pytest.raises(ConfigError, match="shared"):
        PLE(4, 2, shared=0, specific=0)


def test_bench_run_record():
    from moekit.bench.multitask import _one

    r = _one("home", synthetic_tasks(n_train=64, n_test=16, seed=0), epochs=1, seed=0)
    assert r["params"] > 0 and len(r["mse"]) == 2 and r["experts"] == 8 and set(r["shared_use"]) == {0, 1}
