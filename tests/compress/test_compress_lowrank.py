"""Low-rank experts (MC-SMoE's SVD step): exact at full rank, the Eckart-Young error at lower rank, the same forward
as the family's experts holding the low-rank products, saved through the manifest and loaded back (moekit and
transformers' trust_remote_code) with the same logits and fewer bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.lowrank import apply_lowrank, plan_lowrank
from moekit.core.experts.lowrank import LowRankExperts
from moekit.errors import ConfigError
from moekit.hf.info import describe

IDS = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(7))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_full_rank_is_exact(family):
    model = tiny_model(family)
    want = _logits(model)
    plan = plan_lowrank(model, 0.5)
    for entry, block in zip(plan.layers.values(), mh.view(model), strict=True):
        entry["rank"] = min(block.experts.hidden_size, 2 * block.experts.intermediate_size)  # gate_up's full rank
    apply_lowrank(model, plan)
    assert all(isinstance(b.experts.module, LowRankExperts) for b in mh.view(model))
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_lower_rank_error_is_the_discarded_singular_values_and_runs_like_dense_products(family):
    model = tiny_model(family)
    original = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone())
                for b in mh.view(model)]
    plan = plan_lowrank(model, 0.3)
    apply_lowrank(model, plan)
    for block, (gate_up, down), entry in zip(mh.view(model), original, plan.layers.values(), strict=True):
        r = entry["rank"]
        for dense, low in ((gate_up, block.experts.gate_up_proj), (down, block.experts.down_proj)):
            for e in range(block.num_experts):
                discarded = torch.linalg.svdvals(dense[e].double())[r:]
                error = torch.linalg.matrix_norm((dense[e] - low[e].detach()).double())
                assert float(error) == pytest.approx(float(discarded.norm()), rel=1e-4, abs=1e-6)
    # the factored forward equals transformers' own experts holding the dense products
    dense_model = tiny_model(family)  # same seed: same biases, router and attention
    for src, dst in zip(mh.view(model), mh.view(dense_model), strict=True):
        with torch.no_grad():
            dst.experts.gate_up_proj.copy_(src.experts.gate_up_proj)
            dst.experts.down_proj.copy_(src.experts.down_proj)
    torch.testing.assert_close(_logits(model), _logits(dense_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_save_and_load_back_with_fewer_bytes(tmp_path, family):
    model = tiny_model(family)
    dense_bytes = sum(p.numel() for b in mh.view(model) for p in b.experts.module.parameters())
    apply_lowrank(model, plan_lowrank(model, 0.25))
    low_bytes = sum(p.numel() for b in mh.view(model) for p in b.experts.module.parameters())
    assert low_bytes < 0.65 * dense_bytes
    want = _logits(model)
    out = mh.save(copy.deepcopy(model), tmp_path / "out")
    torch.testing.assert_close(_logits(mh.load(out)), want, rtol=1e-6, atol=1e-6)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(mh.view(remote)[0].experts.module).__name__ == "LowRankExperts"
    torch.testing.assert_close(_logits(remote), want, rtol=1e-6, atol=1e-6)
    info = describe(out)  # `moekit info` counts the factors
    assert info["total_params"] == sum(t.numel() for t in remote.state_dict().values())


def test_fraction_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="fraction"):
        plan_lowrank(tiny_model("qwen3_moe"), 1.0)
