"""`moekit bench seeds` systems `union` and `moduleformer`: quick runs give every contender with losses that
learned something and the active-parameter shares the configurations imply; the byte task's windows; added
modules train alone (old modules, old router rows and everything else unchanged); pruning by usage keeps the most
used modules and, for unused ones, the outputs."""

import math

import pytest
import torch

from moekit.bench.seed_tasks import VOCAB, TextTask, text_task
from moekit.bench.seeds import CLAIMS, bench_seeds
from moekit.bench.seeds_modular import (
    add_module_params,
    module_params,
    moduleformer_lm,
    prune_by_usage,
    train_lm,
)
from moekit.errors import ConfigError


def test_quick_union_records_and_active_shares():
    records = {r["contender"]: r for r in bench_seeds(["union"], quick=True)}
    assert len(records) == 4
    for r in records.values():
        assert r["paper_claim"] == CLAIMS["union"] and 0 <= r["accuracy"] <= 1
        assert 0 < r["test_loss"] < math.log(VOCAB) - 0.5  # below the uniform guess: it trained
    small, moe, uoe, full = records.values()
    # per layer: dense 2 heads x 8 = 4096 + MLP 32 = 4096; uoe: (selector 65 + router 512) per part in full, a
    # quarter of its 16384 head-expert and 16384 MLP-expert weights; the MoE: that attention, router 512, a quarter
    assert small["active_share"] == full["active_share"] == 1.0
    assert small["active_params"] == 2 * 8192 and full["active_params"] == 2 * 32768
    assert uoe["active_params"] == 2 * 2 * (577 + 4096)
    assert uoe["active_share"] == pytest.approx((577 + 4096) / (577 + 16384), abs=1e-4)
    assert moe["active_share"] == pytest.approx((4096 + 512 + 4096) / (4096 + 512 + 16384), abs=1e-4)


def test_quick_moduleformer_records():
    records = bench_seeds(["moduleformer"], quick=True)
    assert len(records) == 8 and all(r["paper_claim"] == CLAIMS["moduleformer"] for r in records)
    base, all_, mods, added, mi, conc, mi_pruned, pruned = records
    for r in records:
        assert 0 < r["loss_a"] < 6 and 0 < r["loss_b"] < 6
    assert base["modules"] == all_["modules"] == mods["modules"] == mi["modules"] == conc["modules"] == 2 * (8 + 8)
    assert added["modules"] == 2 * (8 + 4 + 8 + 4)
    assert 2 * (2 + 2) <= pruned["modules"] == mi_pruned["modules"] <= 32
    assert added["loss_b"] < base["loss_b"]  # the new modules alone learn something of task B


def test_text_task_windows():
    task = text_task("code", seq_len=16, test_windows=8)
    assert task.test.shape == (8, 17) and len(task.train) > 10_000
    assert int(task.train.max()) < VOCAB and int(task.test.min()) >= 0
    batch = task.batch(5, torch.Generator().manual_seed(0))
    assert batch.shape == (5, 17)
    windows = task.train.unfold(0, 17, 1)  # every window of the training stream
    assert all(bool((windows == row).all(1).any()) for row in batch)
    with pytest.raises(ConfigError, match="domain="):
        text_task("poetry")
    with pytest.raises(ConfigError, match="seq_len="):
        text_task("prose", seq_len=0)


def _random_task(seed: int = 0) -> TextTask:
    g = torch.Generator().manual_seed(seed)
    return TextTask(torch.randint(0, VOCAB, (4000,), generator=g), torch.randint(0, VOCAB, (4, 33), generator=g))


def test_added_modules_train_alone():
    torch.manual_seed(0)
    model = moduleformer_lm()
    params = add_module_params(model, heads=2, experts=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_lm(model, _random_task(), 3, seed=0, params=params)
    grown = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in grown:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
            continue
        old = 8
        torch.testing.assert_close(p[:old], before[name][:old], rtol=0, atol=0, msg=name)
        assert not torch.equal(p[old:], before[name][old:]), name
    assert model.blocks[0].attn.num_heads == 10 and model.blocks[1].ffn.num_experts == 11
    assert len(params) == 12


def test_module_params_freeze_the_rest():
    torch.manual_seed(1)
    model = moduleformer_lm()
    embed = model.embed.weight.detach().clone()
    q = model.blocks[0].attn.q_proj.detach().clone()
    train_lm(model, _random_task(1), 2, seed=1, params=module_params(model))
    assert torch.equal(model.embed.weight, embed) and not torch.equal(model.blocks[0].attn.q_proj, q)


def test_prune_by_usage_keeps_the_most_used_and_the_outputs():
    torch.manual_seed(2)
    model = moduleformer_lm()
    ids = _random_task(2).test[:, :-1]
    (heads, experts), _ = model.module_usage(ids)
    q = model.blocks[0].attn.q_proj.detach().clone()
    up = model.blocks[0].ffn.experts.gate_up_proj.detach().clone()
    kept = prune_by_usage(model, ids, keep=[(3, 2), (2, 4)])
    assert kept == [(3, 2), (2, 4)]
    top_h = sorted(torch.argsort(heads, descending=True, stable=True)[:3].tolist())
    top_e = sorted(torch.argsort(experts, descending=True, stable=True)[:2].tolist())
    torch.testing.assert_close(model.blocks[0].attn.q_proj, q[top_h])
    torch.testing.assert_close(model.blocks[0].ffn.experts.gate_up_proj, up[top_e])

    torch.manual_seed(2)
    model = moduleformer_lm()
    usage = model.module_usage(ids)
    with torch.no_grad():
        want = model(ids)[0]
    kept = prune_by_usage(model, ids, min_share=0.0)  # only modules no token chose go
    assert kept == [(int((h > 0).sum()), int((e > 0).sum())) for h, e in usage]
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], want, atol=1e-5, rtol=1e-5)
