"""Quantization of experts: each format within its bound, quantized experts in moekit's dispatch equal transformers'
own experts holding the dequantized weights, bytes really drop, plans round-trip, bad input is refused."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.quantize import QuantPlan, apply_quant, parse_spec, plan_quant, resident_bytes
from moekit.core.experts.qformat import QuantizedExperts, QuantizedMatrix, decode, encode
from moekit.errors import ConfigError
from moekit.hf.headers import CheckpointError
from moekit.hf.info import describe
from moekit.hf.manifest import MANIFEST, QFORMAT

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def _groups(w: torch.Tensor, g: int) -> list[list[tuple[int, int]]]:
    """(row, column) positions of each group of an [out, in] matrix, walked by hand."""
    out = []
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            out.append([(r, c) for c in range(start, min(start + g, w.shape[1]))])
    return out


@pytest.mark.parametrize("fmt,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("shape,group,eff", [((6, 40), 64, 40), ((5, 130), 64, 64), ((3, 20), 16, 16)])
def test_symmetric_formats_within_half_a_step(fmt, qmax, shape, group, eff):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.3
    w[0, :3] = 0.0
    codes, scale = encode(w, fmt, group)
    deq = decode(codes, scale, fmt, w.shape[1], torch.float32)
    assert deq.shape == w.shape
    for i, group_pos in enumerate(_groups(w, eff)):
        s = float(scale.view(-1)[i])
        vals = [float(w[p]) for p in group_pos]
        assert s >= max(abs(v) for v in vals) / qmax  # no code clipped
        for p, v in zip(group_pos, vals, strict=True):
            q = float(deq[p]) / s
            assert abs(q - round(q)) < 1e-4 and abs(round(q)) <= qmax
            assert abs(v - float(deq[p])) <= s / 2 * (1 + 1e-6) + 1e-12
    # really packed: int4 holds two codes per byte, int8 one
    per_row = math.ceil(shape[1] / eff) * eff
    assert codes.numel() * codes.element_size() == shape[0] * per_row * (1 if fmt == "int8" else 0.5)


@pytest.mark.parametrize("shape,group", [((4, 40), 64), ((3, 100), 32)])
def test_ternary_is_absmean_sign_of_three_levels(shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    codes, scale = encode(w, "ternary", group)
    assert codes.dtype == torch.uint8 and codes.numel() * 4 >= w.numel() and codes.numel() * 4 < w.numel() + 4 * 64
    deq = decode(codes, scale, "ternary", w.shape[1], torch.float32)
    for i, group_pos in enumerate(_groups(w, min(group, shape[1]))):
        s = float(scale.view(-1)[i])
        mean_abs = sum(abs(float(w[p])) for p in group_pos) / len(group_pos)
        assert s == pytest.approx(mean_abs, rel=1e-3)  # float16 rounding of the absmean
        for p in group_pos:
            q = max(-1, min(1, round(float(w[p]) / s)))
            assert float(deq[p]) == pytest.approx(q * s, abs=1e-7)


def test_bf16_format_rounds_only():
    w = torch.randn(3, 7)
    codes, scale = encode(w, "bf16", 64)
    assert scale is None and torch.equal(decode(codes, scale, "bf16", 7, torch.float32), w.to(torch.bfloat16).float())


def _dense_reference(model, quantized):
    """A float copy of the unquantized model holding the quantized experts' dequantized weights in the family's
    own fused layout, run by transformers' own experts forward."""
    ref = copy.deepcopy(model)
    for b, qb in zip(mh.view(ref), mh.view(quantized), strict=True):
        q = qb.experts.module
        ups = [q.gate_up_q[e].dequantize(torch.float32) for e in range(q.num_experts)]
        downs = [q.down_q[e].dequantize(torch.float32) for e in range(q.num_experts)]
        if b.family.transposed:
            ups, downs = [u.t() for u in ups], [d.t() for d in downs]
        with torch.no_grad():
            b.experts.module.gate_up_proj.copy_(torch.stack(ups))
            b.experts.module.down_proj.copy_(torch.stack(downs))
    return ref


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("spec", ["int8", "int4", "ternary"])
def test_quantized_experts_equal_dense_dequantized_reference(model_type, spec):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    apply_quant(model, plan_quant(model, None, spec))
    assert all(isinstance(b.experts.module, QuantizedExperts) for b in mh.view(model))
    expected = _logits(_dense_reference(original, model))
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)
    for b in mh.view(model):  # the thread-pool dispatch and the plain (checkpoint) forward agree too
        b.experts.module.impl = "threads"
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)
    for b in mh.view(model):
        b.experts.module.forward = QuantizedExperts.forward.__get__(b.experts.module)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


def test_quantized_experts_follow_the_model_dtype():
    model = tiny_model("qwen3_moe")
    apply_quant(model, plan_quant(model, None, "int4"))
    expected = _logits(model)
    model.to(torch.float64)
    assert mh.view(model)[0].experts.gate_up_proj.dtype == torch.float64  # what dispatch casts the tokens to
    got = _logits(model)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=0)


def test_only_routed_experts_are_dequantized(monkeypatch):
    model = tiny_model("mixtral")
    apply_quant(model, plan_quant(model, None, "int4"))
    experts = mh.view(model)[0].experts.module
    seen = []
    original = QuantizedMatrix.dequantize

    def counting(self, dtype):
        seen.append(self)
        return original(self, dtype)

    monkeypatch.setattr(QuantizedMatrix, "dequantize", counting)
    x = torch.randn(5, 40)
    idx = torch.tensor([[2, 4]] * 5)
    out = experts(x, idx, torch.full((5, 2), 0.5))
    hit = {id(m) for e in (2, 4) for m in (experts.gate_up_q[e], experts.down_q[e])}
    assert {id(m) for m in seen} == hit and out.shape == x.shape
    # index num_experts means "no expert" (transformers' masking convention): contributes nothing
    seen.clear()
    idx_skip = torch.tensor([[2, 6]] * 5)
    skipped = experts(x, idx_skip, torch.full((5, 2), 0.5))
    alone = experts(x, torch.tensor([[2]] * 5), torch.full((5, 1), 0.5))
    torch.testing.assert_close(skipped, alone)


@pytest.mark.parametrize("spec,limit", [("int8", 0.3), ("int4", 0.16), ("ternary", 0.1)])
def test_resident_bytes_really_drop(spec, limit):
    model = tiny_model("qwen3_moe", hidden_size=64, moe_intermediate_size=64)
    before = resident_bytes(model)
    plan = plan_quant(model, None, spec)
    apply_quant(model, plan)
    after = resident_bytes(model)
    assert after["experts"] < limit * before["experts"]
    assert after["experts"] == plan.expert_bytes
    assert after["rest"] == before["rest"] and after["total"] == after["experts"] + after["rest"]
    held = sum(t.numel() * t.element_size() for b in mh.view(model)
               for t in (*b.experts.module.buffers(), *b.experts.module.parameters()))
    assert held == after["experts"]


def test_plan_json_round_trip_and_bad_input():
    model = tiny_model("olmoe", hidden_size=64, intermediate_size=32)
    plan = plan_quant(model, None, "int4", group_size=32)
    again = QuantPlan.from_json(plan.to_json())
    assert again == plan and again.layers == {0: ["int4"] * 6, 1: ["int4"] * 6}
    assert again.bits_per_weight() == pytest.approx(4 + 16 / 32)  # a float16 scale per 32 four-bit codes
    for spec in ("int3", "mixed:", "mixed:-5", "mixed:12XB", "mixed:0"):
        with pytest.raises(ConfigError, match="quant"):
            parse_spec(spec)
    assert parse_spec("mixed:2.5MB") == ("mixed", 2_500_000) and parse_spec("mixed:1KiB") == ("mixed", 1024)
    with pytest.raises(ConfigError, match="group_size"):
        plan_quant(model, None, "int8", group_size=6)
    with pytest.raises(ConfigError, match="plan: format 'int5'"):
        QuantPlan.from_json(plan.to_json().replace('"int4"', '"int5"'))
    with pytest.raises(ConfigError, match="plan: expected a quantization plan"):
        QuantPlan.from_json("{}")
    bad = QuantPlan(plan.spec, plan.group_size, {0: plan.layers[0]})
    with pytest.raises(ConfigError, match=r"plan.layers: covers layers \[0\]"):
        apply_quant(model, bad)
    apply_quant(model, plan)
    with pytest.raises(ConfigError, match="already quantized"):
        plan_quant(model, None, "int8")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2"])
def test_save_then_load_gives_the_same_logits(model_type, tmp_path):
    model = tiny_model(model_type)
    float_info = describe(mh.save(model, tmp_path / "float"))
    budget = (plan_quant(model, None, "ternary").expert_bytes + plan_quant(model, None, "int8").expert_bytes) // 2
    plan = plan_quant(model, None, f"mixed:{budget}")
    assert len({f for fs in plan.layers.values() for f in fs}) > 1  # a real mix of formats goes through the file
    apply_quant(model, plan)
    expected = _logits(model)
    out = mh.save(model, tmp_path / "out")
    assert (out / MANIFEST).exists() and (out / QFORMAT).exists()
    info = describe(out)  # `moekit info`: logical parameters, the real (smaller) bytes, the formats
    assert (info["experts_per_layer"], info["total_params"], info["active_params"]) == \
        (float_info["experts_per_layer"], float_info["total_params"], float_info["active_params"])
    assert info["total_bytes"] < float_info["total_bytes"] and info["quantization"].startswith("moekit ")
    loaded = mh.load(out, attn_implementation="eager")
    assert torch.equal(_logits(loaded), expected)
    assert [b.experts.module.formats for b in mh.view(loaded)] == list(plan.layers.values())
    assert resident_bytes(loaded)["experts"] == plan.expert_bytes
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(mh.view(plain)[0].experts.module).__name__ == "QuantizedExperts"  # the checkpoint's own copy
    torch.testing.assert_close(_logits(plain), expected, atol=1e-6, rtol=0)


def test_quantized_checkpoint_errors(tmp_path):
    model = tiny_model("olmoe")
    apply_quant(model, plan_quant(model, None, "int4"))
    out = mh.save(model, tmp_path / "out")
    manifest = json.loads((out / MANIFEST).read_text())
    for fmt, match in (("int5", "quant format 'int5'; expected one of"),
                       ("int8", r"experts\.(gate_up|down)_q\.0\.codes is U8\[.*\]; moekit.json with config.json .* "
                                r"expects")):
        bad = shutil.copytree(out, tmp_path / fmt)
        manifest["quant"]["0"]["formats"][0] = fmt
        (bad / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=match):
            mh.load(bad)
