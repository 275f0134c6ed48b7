"""bf16 and fp16 dispatch, every implementation, against tests/reference.py (float64 on the same rounded weights):
hypothesis shapes, biases, GPT-OSS's transposed layout; outputs keep the input dtype, combined in float32."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.core.dispatch import candidate_impls, dispatch, grouped_mm_supported, plan_dispatch
from moekit.core.experts import Experts
from moekit.core.routing import Routing
from reference import ref_moe

HALF = [torch.bfloat16, torch.float16]
# relative error of one rounding: bf16 keeps 8 significant bits, fp16 11; a few roundings per expert
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@given(num_experts=st.integers(1, 12), data=st.data(), num_tokens=st.integers(1, 40),
       hidden=st.sampled_from([8, 16, 24, 64]), width=st.sampled_from([8, 16, 40]),
       activation=st.sampled_from(["swiglu", "geglu", "gelu", "gpt_oss"]), impl=st.sampled_from(["loop", "grouped_mm",
                                                                                                "threads", "auto"]),
       dtype=st.sampled_from(HALF), transposed=st.booleans(), bias=st.booleans(), seed=st.integers(0, 999))
def test_half_dispatch_matches_reference(num_experts, data, num_tokens, hidden, width, activation, impl, dtype,
                                         transposed, bias, seed):
    k = data.draw(st.integers(1, num_experts))
    torch.manual_seed(seed)
    experts = Experts(num_experts, hidden, width, activation, bias=bias, transposed=transposed, dtype=dtype)
    if bias:
        with torch.no_grad():
            experts.gate_up_proj_bias.normal_(std=0.1)
            experts.down_proj_bias.normal_(std=0.1)
    x = torch.randn(num_tokens, hidden).to(dtype)
    logits = torch.randn(num_tokens, num_experts)
    weights, indices = torch.softmax(logits, -1).topk(k)
    plan = plan_dispatch(Routing(logits, weights, indices), num_experts)
    with torch.no_grad():
        got = dispatch(x, plan, experts, impl)
    assert got.dtype == dtype and got.shape == x.shape
    want = ref_moe(x.double(), indices, weights.double(), experts).detach()
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_grouped_mm_runs_half_precision(dtype):
    """grouped_mm is a candidate in both half dtypes (torch's CPU kernel takes them), not a silent loop."""
    experts = Experts(4, 32, 16, dtype=dtype)
    xs = torch.randn(10, 32).to(dtype)
    assert grouped_mm_supported(xs, experts) and "grouped_mm" in candidate_impls(xs, experts)
