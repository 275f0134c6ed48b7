from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.adapt.continual import SEMA, TAME, LossJumpDetector, permuted_digits
from moekit.bench.continual import _pretrained_backbone, run
from moekit.errors import ConfigError


def fires(losses, detector=None) -> list[int]:
    detector = detector or LossJumpDetector()
    return [i for i, v in enumerate(losses) if detector.update(v)]


def test_detector_fires_on_a_planted_jump_and_not_on_noise_of_the_same_variance():
    rng = np.random.default_rng(0)
    sigma = 0.1
    jump = np.concatenate([rng.normal(1.0, sigma, 300), rng.normal(1.0 + 3 * sigma, sigma, 60)])
    hits = fires(jump)
    assert hits and 300 <= hits[0] < 315  # within the recent window of the jump, never before it
    assert fires(rng.normal(1.0, sigma, 3000)) == []
    assert fires(np.linspace(2.0, 0.1, 500) + rng.normal(0, sigma, 500)) == []  # a falling loss never fires


def test_tame_spawns_for_a_new_task_and_switches_back_on_recurrence():
    seq = permuted_digits(n_tasks=2, order=[0, 1, 0], seed=0)
    tame = TAME(64, 10, seed=0)
    r = run(tame, seq, epochs=2, batch_size=32, seed=0)
    assert [kind for _, kind, _ in tame.events] == ["spawn", "switch"]
    assert [e for _, _, e in tame.events] == [1, 0] and r["experts"] == 2
    pruned = next(p for p in tame.experts[1].parameters() if p.dim() > 1)
    assert (pruned == 0).float().mean() >= 0.5 and not pruned.requires_grad  # left behind: pruned and frozen


def test_tame_keeps_the_usual_range_of_the_expert_as_pruned():
    # pruning raises an expert's loss; the range a recurring task is compared with must be measured after it
    seq = permuted_digits(n_tasks=1, order=[0], seed=0)
    x, y = seq.train[0]
    tame = TAME(64, 10, seed=0)
    for idx in torch.arange(len(x)).repeat(8).split(32):  # a trained expert, no task change
        tame.observe(x[idx], y[idx])
    reference = list(tame.recent)[:50]  # the batches the detector's reference losses came from
    unpruned = tame.detector.typical()[0]
    tame._leave(0)
    with torch.no_grad():
        pruned = [float(torch.nn.functional.cross_entropy(tame.experts[0](bx), by)) for bx, by in reference]
    assert tame.typical[0] == pytest.approx((np.mean(pruned), np.std(pruned)))
    assert tame.typical[0][0] > unpruned


def test_sema_expands_on_a_shift_and_reuses_on_recurrence():
    seq = permuted_digits(n_tasks=2, order=[0, 1, 0], seed=0)
    sema = SEMA(_pretrained_backbone(seq, 64, 0), 64, seed=0)
    r = run(sema, seq, epochs=2, batch_size=32, seed=0)
    assert r["experts"] == 2 and len(sema.expansions) == 2 and sema.router.out_features == 2
    assert all(not p.requires_grad for p in sema.backbone.parameters())


def test_bad_continual_arguments():
    with pytest.raises(ConfigError, match="alpha"):
        LossJumpDetector(alpha=0)
    with pytest.raises(ConfigError, match="prune"):
        TAME(4, 2, prune=1.0)
    with pytest.raises(ConfigError, match="order"):
        permuted_digits(n_tasks=2, order=[0, 2])


def test_corpus_domains_are_next_byte_tasks():
    from moekit.adapt.continual import byte_features, corpus_domains

    x, y = byte_features(b"abcd", context=2, buckets=4)
    assert y.tolist() == [ord("c"), ord("d")]
    assert x[0].nonzero().flatten().tolist() == [ord("a") % 4, 4 + ord("b") % 4]
    seq = corpus_domains(samples=100)
    assert seq.names == ["prose", "code"] and seq.order == [0, 1, 0, 1] and seq.n_classes == 256
    assert [len(t[0]) for t in seq.train] == [100, 100] and seq.train[0][0].shape[1] == 192


def test_pruned_weights_stay_zero_when_an_expert_is_trained_again():
    import torch

    from moekit.adapt.continual import apply_masks, mlp, prune_masks

    torch.manual_seed(0)
    net = mlp(8, 16, 3)
    masks = prune_masks(net, 0.5)
    assert all((~keep).float().mean() >= 0.5 for _, keep in masks)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    apply_masks(masks)
    assert all((p[~keep] == 0).all() for p, keep in masks)


def test_sea_concepts_are_the_four_sea_functions():
    from moekit.adapt.continual import sea_concepts

    seq = sea_concepts(samples=40, noise=0.0)
    assert seq.order == [0, 1, 2, 3, 0, 1, 2, 3] and seq.n_classes == 2 and len(seq.train) == 4
    x, y = seq.train[0]
    assert x.shape == (40, 3) and ((x >= 0) & (x <= 1)).all()
    assert torch.equal(y, ((x[:, 0] + x[:, 1]) * 10 > 8).long())  # SEA function 0: f1 + f2 > 8, no noise
