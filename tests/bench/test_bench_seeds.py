"""`moekit bench seeds --quick` runs end to end: one record per contender, the paper's claim and the machine in
each; unknown systems are refused by name. AdvMoE's MoE CNN: each image runs its router-chosen channel groups, and
gradients reach the router (straight-through) and only the chosen groups."""

import pytest
import torch
import torch.nn.functional as F

from moekit.bench.seed_tasks import ConvMoENet
from moekit.bench.seeds import CLAIMS, SYSTEMS, bench_seeds
from moekit.errors import ConfigError


def test_quick_records_carry_claim_metrics_and_environment():
    records = bench_seeds(["thor", "sparse_ot"], quick=True)
    assert [r["system"] for r in records] == ["thor"] * 3 + ["sparse_ot"] * 3
    for r in records:
        assert r["paper_claim"] == CLAIMS[r["system"]] and 0 <= r["accuracy"] <= 1
        assert {"cpu", "torch", "threads", "steps", "seeds"} <= set(r)
    capped = [r for r in records if r["contender"].startswith("sparse_ot")][0]
    assert capped["max_tokens_per_expert"] <= 160  # ceil(1.25 * 256 * 2 / 4)
    assert set(SYSTEMS) == set(CLAIMS)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="--system"):
        bench_seeds(["nope"], quick=True)
    with pytest.raises(ConfigError, match="--seeds"):
        bench_seeds(["thor"], quick=True, seeds=0)


def test_conv_moe_is_each_images_expert_pathway():
    """ConvMoENet against a per-image reference: the router's top-1 expert e, then conv1 with only group e's
    filters, ReLU, max-pool, conv2 with only group e's filters, ReLU, mean, head."""
    torch.manual_seed(0)
    model = ConvMoENet(experts=3, width1=4, width2=5)
    x = torch.rand(6, 64)
    with torch.no_grad():
        got = model(x)
        expect = []
        for img in x.view(-1, 1, 1, 8, 8):
            e = int(model.router(img).argmax())
            w1, b1 = model.conv1.weight[4 * e:4 * e + 4], model.conv1.bias[4 * e:4 * e + 4]
            w2, b2 = model.conv2.weight[5 * e:5 * e + 5], model.conv2.bias[5 * e:5 * e + 5]
            h = F.max_pool2d(torch.relu(F.conv2d(img, w1, b1, padding=1)), 2)
            h = torch.relu(F.conv2d(h, w2, b2, padding=1))
            expect.append(model.head(h.mean((2, 3)))[0])
    torch.testing.assert_close(got, torch.stack(expect))
    assert len({int(e) for e in model.router_logits(x).argmax(-1)}) > 1  # the case exercises several experts


def test_conv_moe_gradients_reach_the_router_and_only_the_chosen_groups():
    torch.manual_seed(1)
    model = ConvMoENet(experts=4, width1=2, width2=3)
    x = torch.rand(5, 64)
    chosen = set(model.router_logits(x).argmax(-1).tolist())
    F.cross_entropy(model(x), torch.arange(5)).backward()
    assert float(model.router[-1].weight.grad.abs().sum()) > 0  # straight-through to the scores
    for e in range(4):
        g = float(model.conv2.weight.grad[3 * e:3 * e + 3].abs().sum())
        assert (g > 0) == (e in chosen), e
    with pytest.raises(ConfigError, match="experts=0"):
        ConvMoENet(experts=0)


def test_quick_advmoe_cnn_records():
    records = bench_seeds(["advmoe_cnn"], quick=True)
    assert [r["contender"] for r in records] == ["dense CNN (one expert's width), vanilla AT", "MoE CNN, vanilla AT",
                                                 "MoE CNN, advmoe (authors' TRADES form)"]
    for r in records:
        assert 0 <= r["robust_accuracy"] <= 1 and 0 <= r["clean_accuracy"] <= 1 and 0 <= r["routing_changed"] <= 1
        assert r["steps"] == 7 and r["paper_claim"] == CLAIMS["advmoe_cnn"]
