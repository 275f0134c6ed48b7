"""HEAPr: calibration gradients equal autograd's at the block output, scores equal a per-token reference (GPT-OSS's
biased, clamped activation included), neurons that add nothing go first, experts end with different widths that run
as the padded layout does (GPT-OSS's transposed, interleaved layout with biases included)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.compress.heapr import heapr_scores
from moekit.compress.quantize import apply_quant, plan_quant, resident_bytes
from moekit.compress.weights import read_experts, write_block
from moekit.core.experts.quantized import DispatchedQuantizedExperts
from moekit.core.experts.ragged import RaggedExperts, make_ragged
from moekit.errors import ConfigError
from moekit.hf.info import describe


def _windows(n: int = 3, length: int = 20) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(3, 97, (length,), generator=g), None) for _ in range(n)]


def _stats(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return mc.calibrate(model, _windows(), grads=True, progress=False)


def test_calibration_gradient_is_the_loss_gradient_at_the_block_output():
    model = tiny_model("qwen3_moe")
    stats = _stats(model)
    ids = _windows()[0][0][None]
    block = mh.view(model)[1].block
    delta = torch.zeros(1, ids.shape[1], 40, requires_grad=True)
    handle = block.register_forward_hook(lambda _m, _a, out: out + delta)
    try:
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
    finally:
        handle.remove()
    torch.testing.assert_close(stats.layers[1].grad[: ids.shape[1]], delta.grad[0], rtol=1e-4, atol=1e-6)


def _neuron(family, w, e, k, x):
    """Atomic expert k of expert e on one token x [H], by hand."""
    if family != "gpt_oss":
        return F.silu(w.gate[e, k] @ x) * (w.up[e, k] @ x)
    alpha, limit = 1.702, 7.0  # transformers' GPT-OSS defaults (swiglu_alpha, swiglu_limit)
    g = min(float(w.gate[e, k] @ x + w.gate_bias[e, k]), limit)
    u = max(min(float(w.up[e, k] @ x + w.up_bias[e, k]), limit), -limit)
    return (u + 1) * g / (1 + math.exp(-alpha * g))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_scores_match_a_per_token_reference(family):
    model = tiny_model(family)
    stats = _stats(model)
    scores = heapr_scores(model, stats)
    block, s = mh.view(model)[0], stats.layers[0]
    w = read_experts(block)
    t = len(s.x)
    m = sum(torch.outer(s.grad[i], s.grad[i]) for i in range(t)) / t
    for e in (0, 3):
        for k in (0, 7):
            energy = 0.0
            for i in range(t):
                r = sum(float(s.weights[i, j]) for j in range(s.indices.shape[1]) if int(s.indices[i, j]) == e)
                energy += float(r * _neuron(family, w, e, k, s.x[i])) ** 2
            want = energy / t * float(w.down[e][:, k] @ m @ w.down[e][:, k])
            assert float(scores[0][e, k]) == pytest.approx(want, rel=1e-4, abs=1e-12)


def test_neurons_that_add_nothing_are_pruned_first():
    model = tiny_model("qwen3_moe")
    dead = {0: [(0, 3), (2, 5), (4, 0)], 1: [(1, 1), (5, 19)]}
    for block in mh.view(model):
        w = read_experts(block)
        for e, k in dead[block.layer]:
            w.down[e][:, k] = 0.0
        params = block.router_params()
        write_block(block, w, params["weight"].detach())
    stats = _stats(model)
    total = sum(b.num_experts * b.experts.intermediate_size for b in mh.view(model))
    p = mc.plan(model, stats, "heapr", 5 / total)
    for layer, entry in p.layers.items():
        removed = {(e, k) for e, kept in enumerate(entry["neurons"]) for k in range(20) if k not in kept}
        assert removed == set(dead[layer])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "olmoe", "gpt_oss"])
def test_ragged_experts_run_like_the_padded_layout(family):
    model = tiny_model(family)
    p = mc.plan(model, _stats(model), "heapr", 0.3)
    pruned = mc.apply(copy.deepcopy(model), p)
    ids = torch.randint(3, 97, (1, 15))
    # reference: the original model with the removed neurons zeroed (same function, original layout)
    zeroed = copy.deepcopy(model)
    for block in mh.view(zeroed):
        w = read_experts(block)
        for e, kept in enumerate(p.layers[block.layer]["neurons"]):
            mask = torch.zeros(w.width, dtype=torch.bool)
            mask[kept] = True
            w.down[e][:, ~mask] = 0.0
        params = block.router_params()
        write_block(block, w, params["weight"].detach(), params.get("bias"), params.get("e_score_correction_bias"))
    assert any(isinstance(b.experts.module, RaggedExperts) for b in mh.view(pruned))
    widths = [len(n) for entry in p.layers.values() for n in entry["neurons"]]
    assert len(set(widths)) > 1
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, zeroed(ids).logits, rtol=1e-4, atol=1e-5)


def test_statistics_without_gradients_are_refused():
    model = tiny_model("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(model, _windows(), grads=False, progress=False)
    with pytest.raises(ConfigError, match="gradients"):
        mc.plan(model, stats, "heapr", 0.2)


def test_gpt_oss_layers_pruned_to_one_width_keep_the_family_layout():
    """When every expert of a layer keeps the same neurons count, the layer stays GPT-OSS's own experts module
    (transposed, interleaved, biases sliced with their neurons) and computes the zeroed reference's function."""
    model = tiny_model("gpt_oss")
    neurons = [list(range(0, 24, 2)) if e % 2 else list(range(12)) for e in range(6)]
    p = mc.Plan("heapr", 0.5, {b.layer: {"keep": list(range(6)), "neurons": neurons} for b in mh.view(model)})
    pruned = mc.apply(copy.deepcopy(model), p)
    blocks = mh.view(pruned)
    assert all(type(b.experts.module).__name__ == "GptOssExperts" for b in blocks)
    assert all(tuple(b.experts.gate_up_proj.shape) == (6, 40, 24) for b in blocks)
    for block in mh.view(model):
        w = read_experts(block)
        for e, kept in enumerate(neurons):
            w.down[e][:, [k for k in range(24) if k not in kept]] = 0.0
        params = block.router_params()
        write_block(block, w, params["weight"].detach(), params["bias"].detach())
    ids = torch.randint(3, 97, (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_the_ratio_is_met_exactly_when_experts_are_never_routed():
    """An expert no calibration token reaches (asserted) scores 0 on every neuron, so all of them rank lowest; the
    best neuron each expert keeps is not counted against the ratio."""
    model = tiny_model("gpt_oss")
    stats = _stats(model)
    assert any((s.counts() == 0).any() for s in stats.layers)
    p = mc.plan(model, stats, "heapr", 0.5)
    total = 2 * 6 * 24
    assert sum(len(n) for entry in p.layers.values() for n in entry["neurons"]) == total // 2
    assert p.summary == {"neurons_before": total, "neurons_after": total // 2}
    assert all(len(n) >= 1 for entry in p.layers.values() for n in entry["neurons"])


def _int8_bytes(width: int, hidden: int, bias: bool) -> int:
    """Bytes of one expert of `width` in int8 with groups of 64 > hidden = 40, by hand: gate_up [2w, H] is one group
    per row (H codes + a float16 scale); down [H, w] one group per row of w rounded up to 4 codes; float32 biases."""
    return 2 * width * (hidden + 2) + hidden * (4 * math.ceil(width / 4) + 2) + (4 * (2 * width + hidden) if bias
                                                                                  else 0)


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def pruned(request):
    model = tiny_model(request.param)
    return model, mc.apply(copy.deepcopy(model), mc.plan(model, _stats(model), "heapr", 0.3))


@torch.no_grad()
def test_heapr_then_int8_stores_each_expert_at_its_own_width(pruned, tmp_path):
    model, pruned = pruned
    widths = [b.experts.module.widths for b in mh.view(pruned)]
    assert all(len(set(w)) > 1 for w in widths)  # ragged layers
    logical = sum(p.numel() for p in pruned.parameters())
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    ragged_logits = pruned(ids).logits
    plan = plan_quant(pruned, None, "int8")
    quantized = apply_quant(copy.deepcopy(pruned), plan)
    assert all(isinstance(b.experts.module, DispatchedQuantizedExperts) for b in mh.view(quantized))
    expected = quantized(ids).logits
    torch.testing.assert_close(expected, ragged_logits, atol=2e-3, rtol=0)  # int8's error only
    assert not torch.equal(expected, ragged_logits)
    bias = model.config.model_type == "gpt_oss"
    by_hand = sum(_int8_bytes(w, 40, bias) for layer in widths for w in layer)
    assert plan.expert_bytes == resident_bytes(quantized)["experts"] == by_hand
    assert by_hand < plan_quant(model, None, "int8").expert_bytes  # heapr's removed neurons are not stored again
    for layer, q, src in zip(widths, mh.view(quantized), mh.view(pruned), strict=True):  # padded views agree
        for name in ("gate_up_proj", "down_proj"):
            want = getattr(src.experts, name)
            assert getattr(q.experts, name).shape == want.shape
            for e in range(len(layer)):
                got = getattr(q.experts, name)[e]
                torch.testing.assert_close(got, want[e], atol=0.02, rtol=0)
                assert bool((got[want[e] == 0] == 0).all())  # the padding (zeros quantize to 0)
        if bias:
            torch.testing.assert_close(q.experts.gate_up_proj_bias, src.experts.gate_up_proj_bias, atol=0, rtol=0)
    out = mh.save(quantized, tmp_path / "out")
    assert describe(out)["total_params"] == logical
    assert describe(mh.save(pruned, tmp_path / "float"))["total_params"] == logical
    assert torch.equal(mh.load(out, attn_implementation="eager")(ids).logits, expected)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(mh.view(plain)[0].experts.module).__name__ == "QuantizedExperts"  # the checkpoint's own copy
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-6, rtol=0)


def test_heapr_then_mixed_stays_within_the_budget(pruned):
    model, pruned = pruned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = mc.calibrate(pruned, _windows(), progress=False)
    ternary, int8 = (plan_quant(pruned, None, f).expert_bytes for f in ("ternary", "int8"))
    budget = (ternary + int8) // 2
    assert budget < plan_quant(model, None, "int4").expert_bytes  # below what the padded experts would need
    plan = plan_quant(pruned, stats, f"mixed:{budget}")
    assert len({f for fs in plan.layers.values() for f in fs}) > 1
    quantized = apply_quant(copy.deepcopy(pruned), plan)
    assert plan.expert_bytes == resident_bytes(quantized)["experts"] <= budget


def test_experts_without_neurons_are_refused():
    model = tiny_model("qwen3_moe")
    block = mh.view(model)[0]
    make_ragged(block.block, [0, 3, 3, 3, 3, 3], 40, block.family.experts)
    with pytest.raises(ConfigError, match="layer 0: expert 0 has no neurons left"):
        plan_quant(model, None, "int8")
