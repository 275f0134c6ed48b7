"""ModuleFormer: the mutual-information and concentration losses on hand-computed cases; a block of stick-
breaking attention experts and feed-forward experts trains; concentration fine-tuning lets unused modules be
pruned without changing the task's outputs; modules are added without touching the old ones."""

import math

import pytest
import torch

from moekit.core.moduleformer import (
    ModuleFormerBlock,
    ModuleFormerConfig,
    concentration_loss,
    mutual_information_loss,
)
from moekit.errors import ConfigError


def test_losses_on_hand_computed_cases():
    sure_even = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    unsure = torch.full((2, 2), 0.5)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(mutual_information_loss(sure_even)) == pytest.approx(-math.log(2))
    assert float(mutual_information_loss(unsure)) == pytest.approx(0.0, abs=1e-6)
    assert float(mutual_information_loss(collapsed)) == pytest.approx(0.0, abs=1e-6)
    assert float(concentration_loss(sure_even)) == pytest.approx(math.log(2))
    assert float(concentration_loss(collapsed)) == pytest.approx(0.0, abs=1e-6)


def test_block_trains_with_its_losses():
    torch.manual_seed(0)
    block = ModuleFormerBlock(ModuleFormerConfig(16, num_heads=4, head_k=2, num_experts=4, expert_k=2,
                                                 expert_size=16, mi_weight=0.1, concentration_weight=0.05))
    x = torch.randn(2, 6, 16)
    out = block(x)
    assert out.hidden.shape == x.shape
    assert set(out.losses) == {"mi_attention", "mi_ffn", "concentration_attention", "concentration_ffn"}
    want = 0.1 * (out.losses["mi_attention"] + out.losses["mi_ffn"]) + 0.05 * (
        out.losses["concentration_attention"] + out.losses["concentration_ffn"])
    torch.testing.assert_close(out.aux_loss, want)
    (out.hidden.square().mean() + out.aux_loss).backward()
    assert block.attn.router.weight.grad.abs().sum() > 0 and block.ffn.router.weight.grad.abs().sum() > 0


def test_concentration_finetuning_then_pruning_keeps_the_task_outputs():
    torch.manual_seed(1)
    block = ModuleFormerBlock(ModuleFormerConfig(16, num_heads=6, head_k=2, num_experts=8, expert_k=2,
                                                 expert_size=16))
    task = torch.randn(4, 8, 16) + 2 * torch.randn(16)  # one task: tokens share a direction
    heads_before, experts_before = block.usage(task)
    routers = [block.attn.router.weight, block.ffn.router.weight]
    opt = torch.optim.Adam(routers, lr=0.05)
    for _ in range(200):
        out = block(task)
        loss = out.losses["concentration_attention"] + out.losses["concentration_ffn"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads, experts = block.usage(task)
    # measured: 4 of 6 heads and 5 of 8 experts in use before, 2 and 2 (= k) after
    assert int((experts > 0).sum()) == 2 < int((experts_before > 0).sum())
    assert int((heads > 0).sum()) == 2 < int((heads_before > 0).sum())
    with torch.no_grad():
        want = block(task).hidden
    keep_h = [i for i in range(6) if heads[i] > 0]
    keep_e = [i for i in range(8) if experts[i] > 0]
    block.prune_modules(keep_h, keep_e)
    assert block.attn.num_heads == len(keep_h) and block.ffn.num_experts == len(keep_e)
    with torch.no_grad():
        torch.testing.assert_close(block(task).hidden, want, atol=1e-5, rtol=1e-5)


def test_added_modules_leave_the_old_ones_and_bad_values():
    torch.manual_seed(2)
    block = ModuleFormerBlock(ModuleFormerConfig(16, num_heads=4, num_experts=4, expert_size=16))
    old_up = block.ffn.experts.gate_up_proj.detach().clone()
    old_q = block.attn.q_proj.detach().clone()
    block.add_modules(heads=2, experts=3)
    assert block.attn.num_heads == 6 and block.ffn.num_experts == 7 and block.ffn.router.weight.shape[0] == 7
    torch.testing.assert_close(block.ffn.experts.gate_up_proj[:4], old_up)
    torch.testing.assert_close(block.attn.q_proj[:4], old_q)
    assert block(torch.randn(2, 5, 16)).expert_routing.logits.shape[-1] == 7
    with pytest.raises(ConfigError, match="keep_experts"):
        block.prune_modules(keep_experts=[0, 0])
    with pytest.raises(ConfigError, match="mi_weight"):
        ModuleFormerBlock(ModuleFormerConfig(16, mi_weight=-1.0))
    with pytest.raises(ConfigError, match="expert_k"):
        ModuleFormerBlock(ModuleFormerConfig(16, num_experts=2, expert_k=3))
