from __future__ import annotations

import numpy as np
import pytest
import torch
from river import base, evaluate, metrics
from river.datasets import synth

from moekit.adapt import DriftMoE
from moekit.errors import ConfigError, ShapeError


class Fixed(base.Classifier):
    """Always the same probabilities; records what it learned."""

    def __init__(self, proba: dict | None = None) -> None:
        self.proba = proba or {}
        self.seen: list = []

    def learn_one(self, _x, y):
        self.seen.append(y)

    def predict_proba_one(self, _x):
        return dict(self.proba)


def moe_with(probas: list[dict], top_k: int, head_bias: list[float], batch_size: int = 1000) -> DriftMoE:
    moe = DriftMoE(n_experts=len(probas), top_k=top_k, batch_size=batch_size, dropout=0.0)
    moe.experts = [Fixed(p) for p in probas]
    moe._start({"a": 0.0, "b": 0.0})
    with torch.no_grad():
        moe._router.head.weight.zero_()
        moe._router.head.bias.copy_(torch.tensor(head_bias))
    return moe


def test_mask_marks_every_right_expert():
    moe = moe_with([{"a": 0.7, "b": 0.3}, {"b": 0.9, "a": 0.1}, {"a": 0.6, "c": 0.4}], 1, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(moe.correctness_mask({"a": 1.0, "b": 2.0}, "a"), [1, 0, 1])
    np.testing.assert_array_equal(moe.correctness_mask({"a": 1.0, "b": 2.0}, "b"), [0, 1, 0])
    # nobody names "c": the expert giving "c" the highest probability is the target
    np.testing.assert_array_equal(moe.correctness_mask({"a": 1.0, "b": 2.0}, "c"), [0, 0, 1])


def test_top_k_experts_of_the_router_learn_and_the_top_one_predicts():
    moe = moe_with([{"a": 1.0}, {"b": 1.0}, {"c": 1.0}], 2, [0.0, 5.0, 1.0])
    assert moe.predict_one({"a": 0.0, "b": 0.0}) == "b"
    moe.learn_one({"a": 1.0, "b": -1.0}, "a")
    assert [len(e.seen) for e in moe.experts] == [0, 1, 1]
    assert moe.last_learners == [1, 2]
    np.testing.assert_array_equal(moe.last_mask, [1, 0, 0])  # the router is taught expert 0, which did not learn


def test_router_step_moves_logits_toward_the_mask():
    moe = moe_with([{"a": 1.0}, {"b": 1.0}, {"c": 1.0}], 1, [0.0, 0.0, 0.0], batch_size=2)
    before = moe._router.head.bias.detach().clone()
    moe.learn_one({"a": 1.0, "b": 0.0}, "a")
    assert moe.router_steps == 0
    moe.learn_one({"a": 0.0, "b": 1.0}, "a")
    assert moe.router_steps == 1
    step = moe._router.head.bias.detach() - before
    assert step[0] > 0 and step[1] < 0 and step[2] < 0  # BCE toward mask [1, 0, 0] on both instances


def test_task_variant_one_vs_rest_and_one_hot_target():
    moe = DriftMoE(mode="task", batch_size=4)
    moe.learn_one({"v": 1.0}, "x")
    moe.learn_one({"v": 2.0}, "y")
    assert moe.labels == ["x", "y"] and len(moe.experts) == 2 and moe._router.head.out_features == 2
    moe.learn_one({"v": 3.0}, "x")
    np.testing.assert_array_equal(moe.last_mask, [1, 0])
    assert moe.last_learners == [0, 1]
    proba = moe.predict_proba_one({"v": 1.0})
    assert set(proba) == {"x", "y"} and abs(sum(proba.values()) - 1) < 1e-9


@pytest.mark.parametrize("mode", ["data", "task"])
def test_progressive_val_score_learns_sea(mode):
    stream = synth.SEA(variant=0, seed=3).take(1500)
    score = evaluate.progressive_val_score(stream, DriftMoE(mode=mode, n_experts=4, top_k=2), metrics.Accuracy())
    assert score.get() > 0.8  # SEA's majority class is about 0.63


def test_clone_is_a_fresh_model_with_the_same_params():
    moe = DriftMoE(n_experts=5, top_k=2, seed=3)
    moe.learn_one({"a": 1.0}, True)
    fresh = moe.clone()
    assert fresh.n_experts == 5 and fresh.top_k == 2 and fresh.features is None


def test_bad_input():
    with pytest.raises(ConfigError, match="n_experts"):
        DriftMoE(n_experts=0)
    with pytest.raises(ConfigError, match="top_k"):
        DriftMoE(n_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="mode"):
        DriftMoE(mode="class")
    moe = DriftMoE(n_experts=2, top_k=1)
    assert moe.predict_one({"a": 1.0}) is None  # river: nothing learned yet, no prediction
    with pytest.raises(ShapeError, match="'c'"):
        moe.learn_one({"a": 1.0, "c": "red"}, 0)
    with pytest.raises(ShapeError, match="y"):
        moe.learn_one({"a": 1.0}, None)
    x = {"a": 1.0, "b": 2.0}
    for i in range(30):
        moe.learn_one({"a": float(i), "b": 2.0}, i % 2)
    moe.learn_one({"a": 1.0}, 0)  # a missing feature reads as its running mean
    assert moe.predict_one({"b": 1.0}) in (0, 1)
    moe.learn_one(x, 7)  # a label never seen: learned, as river's trees do
    assert 7 in moe.experts[moe.last_learners[0]].predict_proba_one(x)


def test_router_logits_equal_the_torch_router_in_eval_mode():
    moe = DriftMoE(n_experts=4, top_k=2, batch_size=8)
    for i in range(20):
        moe.learn_one({"a": float(i % 3), "b": i * 0.5}, i % 2)
    x = {"a": 1.0, "b": 3.0}
    moe._router.eval()
    with torch.no_grad():
        ref = moe._router(torch.from_numpy(moe._standardise(moe._vector(x)))[None])[0].numpy()
    np.testing.assert_allclose(moe.router_logits(x), ref, rtol=1e-5, atol=1e-6)


def test_each_expert_predicts_once_per_instance_in_progressive_validation():
    class Counting(Fixed):
        calls = 0

        def predict_proba_one(self, _x):
            Counting.calls += 1
            return dict(self.proba)

    moe = moe_with([{"a": 1.0}, {"b": 1.0}, {"c": 1.0}], 1, [0.0, 5.0, 1.0])
    moe.experts = [Counting({"a": 1.0}), Counting({"b": 1.0}), Counting({"c": 1.0})]
    for i in range(3):
        x = {"a": float(i), "b": 0.0}
        moe.predict_one(x)
        moe.learn_one(x, "a")
    assert Counting.calls == 9  # 3 instances x 3 experts: predict_one's answer is reused by learn_one's mask
