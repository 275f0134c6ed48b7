"""m2mKD-style module distillation of a MoEfied model from its dense teacher: each MoE block gets closer to the
teacher's FFN on held-out teacher hidden states, nothing outside the MoE blocks moves, the teacher is untouched.
Multi-teacher distillation: self-paced weights by hand, specialists distilled into their mixed student."""

from __future__ import annotations

import copy

import pytest
import torch
from make_families import dense_model

import moekit.make as mk
from moekit.errors import ConfigError
from moekit.make.btx import mix
from moekit.make.distill import distill_blocks, distill_teachers, progress_weights, self_paced_weights
from moekit.make.finetune import Finetune


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3"])
def test_blocks_move_towards_the_teacher(model_type):
    teacher = dense_model(model_type, ffn_std=0.1)
    student, _ = mk.moefy(teacher, experts=8, k=2, partition="random", router="emoe")
    windows = [torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    before_teacher = {n: p.clone() for n, p in teacher.named_parameters()}
    attn = {n: p.clone() for n, p in student.named_parameters() if "self_attn" in n or "embed" in n}
    report = distill_blocks(student, teacher, windows, steps=150, lr=3e-3)
    assert [r["layer"] for r in report] == [0, 1]
    assert all(r["mse_after"] < 0.7 * r["mse_before"] for r in report)
    assert all(torch.equal(p, before_teacher[n]) for n, p in teacher.named_parameters())
    assert all(torch.equal(p, attn[n]) for n, p in student.named_parameters() if n in attn)


def test_refusals():
    teacher = dense_model("qwen3")
    with pytest.raises(ConfigError, match="no MoE block"):
        distill_blocks(teacher, teacher, [torch.arange(10)])
    student, _ = mk.moefy(teacher, experts=8, k=2)
    with pytest.raises(ConfigError, match="steps=0"):
        distill_blocks(student, teacher, [torch.arange(10)], steps=0)


def test_self_paced_weights_by_hand():
    losses = torch.tensor([3.0, 1.0, 2.0])
    assert self_paced_weights(losses, 0, 3).tolist() == [0.0, 1.0, 0.0]  # the easiest teacher first
    assert self_paced_weights(losses, 1, 3).tolist() == [0.0, 1.0, 1.0]
    assert self_paced_weights(losses, 2, 3).tolist() == [1.0, 1.0, 1.0]
    assert self_paced_weights(losses, 9, 3).tolist() == [1.0, 1.0, 1.0]


def test_progress_weights_follow_a_hand_made_sequence_of_losses():
    """r_d = L_d / L_d(0), w = D r / sum r: equal progress, equal weights; the teacher the student caught up with
    fades, the one it lags behind weighs more."""
    first = torch.tensor([2.0, 4.0])
    seq = [([2.0, 4.0], [1.0, 1.0]),  # step 0: r = [1, 1]
           ([1.0, 4.0], [2 / 3, 4 / 3]),  # r = [1/2, 1]: teacher 0 learnt faster, teacher 1 now weighs twice
           ([1.0, 1.0], [4 / 3, 2 / 3]),  # r = [1/2, 1/4]: now teacher 1 is ahead
           ([0.5, 1.0], [1.0, 1.0])]  # r = [1/4, 1/4]
    for losses, want in seq:
        w = progress_weights(first, torch.tensor(losses))
        assert torch.allclose(w, torch.tensor(want), atol=1e-6), (losses, w)
        assert float(w.sum()) == pytest.approx(2.0)


def test_specialists_distilled_into_the_mixed_student():
    """Two specialists (perturbed copies, each with its own domain of tokens) distilled into their BTX mix: on
    each domain's fixed batch the student's KL to that domain's teacher falls, easiest teacher first."""
    base = dense_model("qwen3", vocab=100)
    teachers = []
    for d in range(2):
        teacher = copy.deepcopy(base)
        g = torch.Generator().manual_seed(30 + d)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        teachers.append(teacher.eval())
    student, _ = mix(teachers, k=1, router="random")
    tokens = [torch.randint(0, 50, (33,), generator=torch.Generator().manual_seed(1)),
              torch.randint(50, 100, (33,), generator=torch.Generator().manual_seed(2))]  # one window each
    records = distill_teachers(student, teachers, tokens, Finetune(steps=15, lr=3e-3, warmup=1, batch_size=2,
                                                                   seq_len=32), pace="easiest", progress=False)
    assert sum(records[0]["weights"]) == 1.0 and sum(records[-1]["weights"]) == 2.0
    first, last = records[0]["teacher_losses"], records[-1]["teacher_losses"]
    assert all(b < 0.7 * a for a, b in zip(first, last, strict=True))
    with pytest.raises(ConfigError, match="one per domain"):
        distill_teachers(student, teachers[:1], tokens, Finetune(steps=1))
