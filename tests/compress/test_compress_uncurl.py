"""UNCURL: spectral clustering of the router-logit columns on the task's tokens, neuron-aligned merging weighted by
task routing counts. Hand-built cases: two domains on which the router pairs the experts differently (the task
decides the clusters); planted permuted copies that UNCURL merges back exactly (the model is unchanged) where
frequency pruning at the same ratio changes it; refusals."""

from __future__ import annotations

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress import apply, calibrate, plan
from moekit.compress.calibrate import LayerStats, Stats
from moekit.compress.uncurl import logit_affinity, plan_uncurl, spectral_groups
from moekit.errors import ConfigError

H = 40


def _unit(i: int) -> torch.Tensor:
    return torch.eye(H)[i]


# router rows: on domain A (hidden states in span(e1, e2, e5)) experts pair as {0,1} {2,3} {4,5};
# on domain B (span(e3, e4, e6)) as {0,2} {1,4} {3,5}
ROWS = [(1, 3), (1, 4), (2, 3), (2, 6), (5, 4), (5, 6)]
PAIRS = {"a": [[0, 1], [2, 3], [4, 5]], "b": [[0, 2], [1, 4], [3, 5]]}


def _two_domain_stats(model) -> Stats:
    g = torch.Generator().manual_seed(0)
    layers = []
    for block in mh.view(model):
        with torch.no_grad():
            block.router.weight.copy_(torch.stack([_unit(a) + _unit(b) for a, b in ROWS]))
        xa = torch.randn(60, 3, generator=g) @ torch.stack([_unit(1), _unit(2), _unit(5)])
        xb = torch.randn(60, 3, generator=g) @ torch.stack([_unit(3), _unit(4), _unit(6)])
        x = torch.cat([xa, xb])
        with torch.no_grad():
            logits, weights, indices = block.router(x)
        layers.append(LayerStats(block.layer, x, None, logits.float(), weights.float(), indices,
                                 torch.cat([torch.zeros(60), torch.ones(60)]).long()))
    return Stats(layers, 120, ["a", "b"])


@pytest.mark.parametrize("task", ["a", "b"])
def test_the_task_decides_the_clusters(task):
    model = tiny_model("qwen3_moe")
    stats = _two_domain_stats(model)
    p = plan_uncurl(model, stats, 0.5, task=task)
    for entry in p.layers.values():
        assert sorted(sorted(g) for g in entry["groups"]) == PAIRS[task]
        for g, w in zip(entry["groups"], entry["weights"], strict=True):  # the task's routing counts, leader first
            counts = stats.layers[0].counts(stats.domain_index(task))[g]
            expect = (counts / counts.sum()).tolist() if counts.sum() > 0 else [0.5, 0.5]
            assert w == pytest.approx(expect)
            assert counts[0] >= counts[1]


def test_spectral_clustering_and_affinity_on_a_hand_case():
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, -3.0], [0.0, 0.0, 1.0, 1.0]])
    a = logit_affinity(logits)
    assert float(a[0, 1]) == pytest.approx(1.0) and float(a[0, 2]) == 0.0
    assert float(a[2, 3]) == 0.0  # columns (0, 0, 1, 1) and (0, 0, -3, 1): cosine -2 / sqrt(20), clipped
    a[2, 3] = a[3, 2] = 0.9  # two blocks
    assert spectral_groups(a, 2) == [[0, 1], [2, 3]]
    assert spectral_groups(a, 4) == [[0], [1], [2], [3]] and spectral_groups(a, 1) == [[0, 1, 2, 3]]


def _planted(model):
    """Experts 1, 3, 5 are neuron-permuted copies of 0, 2, 4, with the same router rows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in mh.view(model):
            e = block.experts.module
            width = e.down_proj.shape[2]
            for src in (0, 2, 4):
                perm = torch.randperm(width, generator=g)
                gate, up = e.gate_up_proj[src][:width], e.gate_up_proj[src][width:]
                e.gate_up_proj[src + 1] = torch.cat([gate[perm], up[perm]])
                e.down_proj[src + 1] = e.down_proj[src][:, perm]
                block.router.weight[src + 1] = block.router.weight[src]
    return model


@pytest.mark.filterwarnings("ignore::moekit.compress.CalibrationWarning")  # a copy that loses every tie is unused
def test_planted_copies_merge_back_exactly_where_frequency_pruning_changes_the_model():
    """Top-1 routing: a token picks one of two identical copies; UNCURL's clusters are the copies (identical logit
    columns), the aligned merge is the expert itself, and the cluster keeps the copies' router row (too few
    tokens to fit one), so the model is unchanged. Dropping the 3 least used experts instead changes it."""
    model = _planted(tiny_model("qwen3_moe", num_experts_per_tok=1))
    windows = [(torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(i)), None) for i in range(3)]
    stats = calibrate(model, windows, progress=False)
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = apply(_planted(tiny_model("qwen3_moe", num_experts_per_tok=1)), plan(model, stats, "uncurl", 0.5))
    for block in mh.view(merged):
        assert block.num_experts == 3
    pruned = apply(_planted(tiny_model("qwen3_moe", num_experts_per_tok=1)), plan(model, stats, "frequency", 0.5))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pruned(input_ids=ids).logits, before, atol=1e-3)


def test_unknown_task_is_refused():
    model = tiny_model("qwen3_moe")
    stats = _two_domain_stats(model)
    with pytest.raises(Exception, match="task='c'"):
        plan(model, stats, "uncurl", 0.5, task="c")
    with pytest.raises(ConfigError, match="ratio"):
        plan(model, stats, "uncurl", 1.0)
