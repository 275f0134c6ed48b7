"""Continued training of a made MoE (`moekit.make.finetune`, `moekit make finetune`): the loss falls on a fixed
batch, DeepSeek-V3's balancing bias moves by the sign rule, the CLI writes a checkpoint plain transformers loads
(input untouched) and refuses bad settings with one line."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from make_families import TEXT, dense_model, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

import moekit.hf as mh
import moekit.make as mk
from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.finetune import Finetune, finetune_model


def test_loss_falls_on_a_fixed_batch_and_the_bias_moves():
    moe, _ = mk.moefy(dense_model("deepseek_v3", vocab=300), experts=8, k=2)
    tokens = torch.randint(0, 300, (33,), generator=torch.Generator().manual_seed(0))  # one window: a fixed batch
    records = finetune_model(moe, tokens, Finetune(steps=12, lr=3e-3, warmup=1, decay="none", batch_size=2,
                                                   seq_len=32, bias_update_rate=1e-2), progress=False)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]  # the MoEfied router itself moves little (param_groups)
    assert not moe.training
    bias = mh.view(moe)[0].router.e_score_correction_bias
    # each step moves every bias by exactly +-rate (or 0 where the load is the mean): a multiple of 1e-2
    assert float(bias.abs().max()) > 0
    assert torch.allclose(bias / 1e-2, (bias / 1e-2).round(), atol=1e-4)
    assert all(len(r["bias_spread"]) == 2 and len(r["load_cv"]) == 2 for r in records)


def test_dense_models_train_too_and_minutes_end_the_run():
    model = dense_model("qwen3", vocab=300)
    tokens = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1))
    records = finetune_model(model, tokens, Finetune(minutes=1e-6, batch_size=2, seq_len=16), progress=False)
    assert len(records) <= 1 and all("load_cv" not in r for r in records)


@pytest.mark.parametrize("settings, message", [
    (Finetune(), "expected --steps or --minutes"),
    (Finetune(steps=0), "--steps=0"),
    (Finetune(minutes=float("nan")), "--minutes=nan"),
    (Finetune(steps=2, lr=-1.0), "--lr=-1.0"),
    (Finetune(steps=2, seq_len=50), "expected more than seq_len=50"),
    (Finetune(steps=2, seq_len=65), "expected at most the model's context of 64"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        finetune_model(dense_model("qwen3", vocab=300), torch.arange(50) % 300, settings, progress=False)


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_cli_make_then_finetune(tmp_path, capsys):
    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("deepseek_v3", vocab=vocab).save_pretrained(src)
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 20)
    moe_dir, out = tmp_path / "moe", tmp_path / "ft"
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--out", str(moe_dir)]) == 0
    before = _digest(moe_dir)
    capsys.readouterr()
    assert main(["make", "finetune", str(moe_dir), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                 "--data", str(data), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["model_type"] == "deepseek_v3"
    assert _digest(moe_dir) == before
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (out / "tokenizer.json").is_file() and (out / "plan.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(moe_dir)
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)
    capsys.readouterr()
    for args, message in ((["--steps", "0"], "--steps=0"), ([], "expected --steps or --minutes")):
        assert main(["make", "finetune", str(moe_dir), *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not (tmp_path / "bad").exists()
    assert main(["make", str(src), "--k", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "--experts: required" in capsys.readouterr().err


def test_default_bias_rate_keeps_a_moefied_models_choice():
    """A MoEfied DeepSeek-V3's router scores differ by ~1e-4 (logits bounded by 1e-3): the default bias step is a
    tenth of their spread, not the recipe's 1e-3, which an upcycled model (router std 0.02) keeps."""
    tokens = torch.randint(0, 300, (33,), generator=torch.Generator().manual_seed(0))
    settings = Finetune(steps=1, lr=1e-4, batch_size=2, seq_len=32)
    dense = dense_model("deepseek_v3", vocab=300)
    moefied, _ = mk.moefy(dense, experts=8, k=2)
    rate = finetune_model(moefied, tokens, settings, progress=False)[0]["bias_rate"]
    assert 0 < rate < 1e-4
    bias = mh.view(moefied)[0].router.e_score_correction_bias
    assert float(bias.abs().max()) == pytest.approx(rate, rel=1e-4)
    upcycled, _ = mk.upcycle(dense, experts=4, k=2)
    assert finetune_model(upcycled, tokens, settings, progress=False)[0]["bias_rate"] == 1e-3


def test_tokenizer_of_the_dense_twin_and_a_checkpoint_without_one(tmp_path, monkeypatch, capsys):
    import moekit.default
    from moekit.make.run import tokenizer_dir

    twin = tmp_path / "twin"
    twin.mkdir()
    monkeypatch.setattr(moekit.default, "DEFAULT_DENSE_DIR", twin)
    assert tokenizer_dir(twin) == moekit.default.DEFAULT_MODEL_DIR  # the twin shares the default's tokenizer
    bare = tmp_path / "bare"
    dense_model("qwen3", vocab=300).save_pretrained(bare)
    assert tokenizer_dir(bare, required=False) is None
    capsys.readouterr()
    assert main(["make", "finetune", str(bare), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer files" in err[0] and not (tmp_path / "out").exists()


def test_schedule_by_hand():
    """Defaults for converged checkpoints: peak 1e-4, warmup 10% of the plan, cosine (or linear) to 10%."""
    from moekit.make.finetune import plan_steps, scheduled_lr

    s = Finetune(steps=100)
    assert s.lr == 1e-4 and s.min_lr_ratio == 0.1
    assert scheduled_lr(s, 0, 100) == pytest.approx(1e-5)  # warmup of 10 steps
    assert scheduled_lr(s, 9, 100) == pytest.approx(1e-4)
    assert scheduled_lr(s, 54, 100) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))  # p = 45 / 90
    # 50 planned: warmup 5, p = (19 + 1 - 5) / 45 = 1/3, cos(pi / 3) = 1/2
    assert scheduled_lr(s, 19, 50) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.75))
    assert scheduled_lr(Finetune(steps=50, decay="linear"), 19, 50) == pytest.approx(1e-4 * (0.1 + 0.9 * 2 / 3))
    assert scheduled_lr(s, 99, 100) == pytest.approx(1e-5)  # 10% at the last planned step
    assert scheduled_lr(Finetune(steps=100, decay="none"), 99, 100) == pytest.approx(1e-4)
    assert scheduled_lr(s, 4, None) == pytest.approx(1e-4 * 5 / 50)  # not planned yet: provisional warmup of 50
    no_warmup = 1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))  # no warmup: step 0 already at p = 1/8
    assert scheduled_lr(Finetune(steps=8, warmup=0), 0, 8) == pytest.approx(no_warmup)
    # --minutes: 5 timed steps (the first, slower, left out), 51 s left at 1 s a step
    assert plan_steps(Finetune(minutes=1.0), [5.0, 1.0, 1.0, 1.0, 1.0], 9.0) == 56
    assert plan_steps(Finetune(minutes=1.0, steps=30), [5.0, 1.0, 1.0, 1.0, 1.0], 9.0) == 30
    with pytest.raises(ConfigError, match="--decay='step'"):
        Finetune(steps=1, decay="step").check()


def test_runs_follow_the_schedule():
    from moekit.make.finetune import PROBE_STEPS, scheduled_lr

    model = dense_model("qwen3", vocab=300)
    tokens = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1))
    settings = Finetune(steps=20, batch_size=2, seq_len=16)
    records = finetune_model(model, tokens, settings, progress=False)
    assert [r["lr"] for r in records] == pytest.approx([scheduled_lr(settings, i, 20) for i in range(20)])
    assert records[-1]["lr"] == pytest.approx(1e-5) and all(r["planned_steps"] == 20 for r in records)
    timed = Finetune(minutes=0.02, batch_size=2, seq_len=16)
    records = finetune_model(model, tokens, timed, progress=False)
    planned = records[-1]["planned_steps"]
    assert all(r["planned_steps"] is None for r in records[:PROBE_STEPS])
    assert planned >= PROBE_STEPS and len(records) <= planned
    assert [r["lr"] for r in records[PROBE_STEPS:]] == pytest.approx(
        [scheduled_lr(timed, i, planned) for i in range(PROBE_STEPS, len(records))])


def test_router_lr_follows_the_routers_scale(monkeypatch):
    """A MoEfied router (logits bounded by 1e-3) moves by a small share of itself; at the full lr (ROUTER_RMS
    patched down) Adam's steps of ~lr per element would swamp it. An upcycled router (std 0.02) has the full lr."""
    import moekit.make.finetune as ft

    dense = dense_model("qwen3", vocab=300)
    moefied, _ = mk.moefy(dense, experts=8, k=2)
    groups = ft.param_groups(moefied, True)
    assert len(groups) == 3 and all(g["lr_scale"] < 0.01 for g in groups[1:])
    upcycled, _ = mk.upcycle(dense, experts=4, k=2)
    assert all(g["lr_scale"] == 1.0 for g in ft.param_groups(upcycled, True))
    tokens = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1))
    settings = Finetune(steps=3, warmup=1, decay="none", batch_size=2, seq_len=16)

    def relative_change(rms: float) -> float:
        monkeypatch.setattr(ft, "ROUTER_RMS", rms)
        model = copy.deepcopy(moefied)
        before = mh.view(model)[0].router.weight.detach().clone()
        finetune_model(model, tokens, settings, progress=False)
        return float((mh.view(model)[0].router.weight.detach() - before).norm() / before.norm())

    assert relative_change(0.01) < 0.1 and relative_change(1e-12) > 1.0
