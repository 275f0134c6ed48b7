"""Dense -> MoE families with a shared expert: a dense DeepSeek-V3 (every layer dense) -> DeepSeek-V3, Qwen2 ->
Qwen2-MoE. Shared + routed experts with every expert on equal the dense model (fp64), the chosen experts act at
weight 1 with fewer on, the shared neurons are the ones with the most activation mass, upcycling with a shared
copy equals the dense model, outputs load in plain transformers, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from make_families import dense_model
from transformers import AutoModelForCausalLM

import moekit.hf as mh
import moekit.make as mk
from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.partition import shared_neurons
from moekit.make.routers import activations

FAMILIES = [("deepseek_v3", "DeepseekV3ForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM")]


@pytest.mark.parametrize("model_type, family", FAMILIES)
def test_shared_and_routed_experts_all_on_equal_dense_fp64(model_type, family):
    """E = k = 8 routed experts plus one shared expert, each 72 / 9 = 8 neurons wide. The routers' logits are
    bounded by 1e-12 (their fp32 sigmoid / softmax is then exactly uniform and 1/8 is exact), so every gate is
    exactly 1 after the down projections' factor (k / routed_scaling_factor; 2 for Qwen2-MoE's shared gate)."""
    model = dense_model(model_type, torch.float64)
    ids = torch.randint(0, 100, (2, 12))
    h = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(ids).logits
        moe, plan = mk.moefy(model, experts=8, k=8, partition="kmeans", router="centroid", max_logit=1e-12)
        assert type(moe).__name__ == family and plan["shared"] == 1
        for i in range(2):
            assert torch.allclose(moe.model.layers[i].mlp(h), model.model.layers[i].mlp(h), rtol=0, atol=1e-12)
            shared, routed = plan["shared_neurons"][str(i)], sum(plan["layers"][str(i)], [])
            assert len(shared) == 8 and sorted(shared + routed) == list(range(72))
        assert torch.allclose(moe(ids).logits, ref, rtol=0, atol=1e-10)
        fewer, _ = mk.moefy(model, experts=8, k=2, max_logit=1e-3)
        assert not torch.allclose(fewer(ids).logits, ref, atol=1e-3)


def _moefied_reference(dense_mlp, moe_block, plan_layer, shared, h, k):
    """The MoEfication rule by hand: the shared neurons plus the k experts with the largest router logits, every
    one at weight 1: a sum over the dense FFN's neurons restricted to those sets."""
    a = dense_mlp.act_fn(dense_mlp.gate_proj(h)) * dense_mlp.up_proj(h)  # [T, I]
    chosen = (h @ moe_block.gate.weight.t()).topk(k, dim=-1).indices  # [T, k]
    parts = torch.tensor(plan_layer)
    mask = torch.zeros_like(a)
    mask[:, shared] = 1
    for t in range(h.shape[0]):
        mask[t, parts[chosen[t]].flatten()] = 1
    return (a * mask) @ dense_mlp.down_proj.weight.t()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2"])
def test_chosen_experts_act_at_weight_one(model_type):
    model = dense_model(model_type)
    moe, plan = mk.moefy(model, experts=8, k=3, partition="random", router="emoe")
    h = torch.nn.functional.normalize(torch.randn(20, 32), dim=-1) * 32 ** 0.5  # RMS-normalised like the FFN input
    with torch.no_grad():
        block = moe.model.layers[1].mlp
        got = block(h.view(1, 20, 32)).view(20, 32)
        want = _moefied_reference(model.model.layers[1].mlp, block, plan["layers"]["1"],
                                  plan["shared_neurons"]["1"], h, 3)
        dense = model.model.layers[1].mlp(h)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 2e-3 * scale  # chosen weights 1 within (1 +- max_logit)
    assert float((dense - want).abs().max()) > 0.05 * scale  # 3 of 8 experts: not the dense output


def test_shared_neurons_by_activation_mass_and_across_domains():
    g = torch.Generator().manual_seed(0)
    acts = 0.1 * torch.randn(300, 20, generator=g)
    acts[:, [3, 11]] *= 30  # every token uses neurons 3 and 11
    domains = torch.arange(300) % 3
    acts[domains == 0, 7] = 50.0  # neuron 7 carries the most mass overall, but only in domain 0
    assert shared_neurons(3, acts).tolist() == [3, 7, 11]
    assert shared_neurons(2, acts, domains=domains).tolist() == [3, 11]
    gate, up, down = torch.ones(20, 4), torch.ones(20, 4), torch.ones(4, 20)
    gate[5] *= 10
    assert shared_neurons(1, weights=(gate, up, down)).tolist() == [5]  # no data: |gate| |up| |down| proxy


def test_shared_expert_takes_the_calibrated_heavy_neurons():
    model = dense_model("deepseek_v3")
    x = torch.randn(64, 32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[[4, 40, 50, 60, 61, 62, 63, 70]] *= 50
    mass = activations(model.model.layers[0].mlp, x).abs().mean(0)
    moe, plan = mk.moefy(model, experts=8, k=2, inputs={0: x, 1: x})
    assert plan["shared_neurons"]["0"] == mass.topk(8).indices.sort().values.tolist()
    assert plan["shared_neurons"]["0"] == [4, 40, 50, 60, 61, 62, 63, 70]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2"])
def test_upcycled_with_a_shared_copy_equals_dense(model_type, tmp_path):
    model = dense_model(model_type)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        moe, plan = mk.upcycle(model, experts=4, k=2)
        assert plan["shared"] == 1 and mh.view(moe)[0].shared.gate_proj.weight.shape == (72, 32)
        assert torch.allclose(moe(ids).logits, ref, atol=1e-5)  # halves from the shared and the routed copies
    mh.save(moe, tmp_path / "up")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "up")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)


def test_deepseek_some_layers_stay_dense_first():
    model = dense_model("deepseek_v3", layers=3)
    moe, plan = mk.moefy(model, experts=8, k=8, layers=[1, 2])
    assert moe.config.first_k_dense_replace == 1 and list(plan["layers"]) == ["1", "2"]
    assert torch.equal(moe.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("model_type, kwargs, message", [
    ("deepseek_v3", {"experts": 8, "k": 2, "layers": [0]}, "expected the last layers (0..1)"),
    ("deepseek_v3", {"experts": 8, "k": 2, "shared": 0}, "always has a shared expert"),
    ("deepseek_v3", {"experts": 6, "k": 2}, "experts=6 + shared=1: expected a divisor of the FFN width 72"),
    ("qwen3", {"experts": 8, "k": 2, "shared": 1}, "qwen3_moe has no shared expert"),
])
def test_bad_settings_refused(model_type, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        mk.moefy(dense_model(model_type), **kwargs)


def test_an_moe_deepseek_is_refused():
    model = dense_model("deepseek_v3")
    moe, _ = mk.moefy(model, experts=8, k=2)
    with pytest.raises(ConfigError, match="already an MoE.*moekit compress"):
        mk.moefy(moe, experts=8, k=2)


def test_cli_dense_deepseek_to_moe(tmp_path, capsys):
    src = tmp_path / "dense"
    model = dense_model("deepseek_v3")
    model.save_pretrained(src)
    out = tmp_path / "moe"
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_type"] == "deepseek_v3" and summary["shared"] == 1
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.n_routed_experts == 8 and loaded.config.n_shared_experts == 1
    assert loaded.config.first_k_dense_replace == 0 and loaded.config.moe_intermediate_size == 8
    capsys.readouterr()
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--shared", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shared=0" in err[0] and not (tmp_path / "x").exists()


def test_widths_grouped_mm_cannot_run_fall_back_to_eager(tmp_path):
    """72 / (7 + 1) = 9 fp32 neurons per expert: rows of 36 bytes, which transformers' grouped_mm refuses. The
    conversion switches the model to eager experts, and the saved checkpoint loads with experts_implementation."""
    model = dense_model("deepseek_v3")
    moe, _ = mk.moefy(model, experts=7, k=7)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        out = moe(ids).logits
        assert torch.allclose(out, model(ids).logits, atol=1e-4)
    moe.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", experts_implementation="eager")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, out, atol=1e-6)
