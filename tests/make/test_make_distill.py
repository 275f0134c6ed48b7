"""m2mKD-style module distillation of a MoEfied model from its dense teacher: each MoE block gets closer to the
teacher's FFN on held-out teacher hidden states, nothing outside the MoE blocks moves, the teacher is untouched."""

from __future__ import annotations

import pytest
import torch
from make_families import dense_model

import moekit.make as mk
from moekit.errors import ConfigError
from moekit.make.distill import distill_blocks


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
