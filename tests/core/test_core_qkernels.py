"""Quantized experts through packed int8/int4 CPU kernels (moekit.core.experts.qkernels) against the dequantize
reference (float64 on the dequantized matrix), fp32 / bf16 / fp16 activations; fallback said once; whichever of
kernel and dequantizing the tuner picks, an expert's output is the same; the packed cache is never saved."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.core import tune
from moekit.core.experts import qkernels
from moekit.core.experts.qformat import QuantizedMatrix
from moekit.core.experts.quantized import DispatchedQuantizedExperts

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _check(kernel, m: QuantizedMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    want = x.double() @ m.dequantize(torch.float64).t()
    if bias is not None:
        want = want + bias.double()
    got = kernel(x, bias)
    assert got.dtype == x.dtype and got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, atol=TOL[x.dtype] * scale, rtol=TOL[x.dtype])


@given(fmt=st.sampled_from(["int8", "int4"]), out_features=st.integers(1, 70), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), short=st.integers(0, 12), rows=st.integers(1, 9),
       dtype=st.sampled_from(list(TOL)), bias=st.booleans(), seed=st.integers(0, 999))
def test_packed_kernels_match_dequantized_reference(fmt, out_features, groups, group, short, rows, dtype, bias, seed):
    torch.manual_seed(seed)
    in_features = groups * group - (short if groups > 1 else 0)  # short: a zero-padded last group
    m = QuantizedMatrix.from_float(torch.randn(out_features, in_features) * 0.05, fmt, group)
    kernel = qkernels.pack(m, dtype)
    assert kernel is not None
    x = torch.randn(rows, in_features).to(dtype)
    _check(kernel, m, x, torch.randn(out_features).to(dtype) if bias else None)


def test_int8_one_group_per_row_uses_codes_in_place():
    m = QuantizedMatrix.from_float(torch.randn(24, 40), "int8", 64)  # group 40: the whole row
    assert m.scale.shape == (24, 1)
    _check(qkernels.pack(m, torch.float32), m, torch.randn(3, 40), None)


def test_unsupported_shapes_fall_back_and_say_so_once(monkeypatch):
    monkeypatch.setattr(qkernels, "_warned", set())
    odd_group = QuantizedMatrix.from_float(torch.randn(32, 40), "int4", 40)
    other_group = QuantizedMatrix.from_float(torch.randn(24, 48), "int4", 48)
    with pytest.warns(qkernels.QuantKernelWarning, match="int4 with group 40") as record:
        assert qkernels.pack(odd_group, torch.float32) is None
        assert qkernels.pack(other_group, torch.float32) is None
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fmt in ("ternary", "bf16"):  # formats without a kernel: dequantized, no warning
            assert qkernels.pack(QuantizedMatrix.from_float(torch.randn(16, 64), fmt, 64), torch.float32) is None


def _experts(formats, widths=None, bias=False):
    torch.manual_seed(0)
    hidden, width = 64, 48
    q = DispatchedQuantizedExperts(formats, 32, hidden, width, bias=bias, act_fn=torch.nn.SiLU(), widths=widths,
                                   device="meta")
    sizes = widths or [width] * len(formats)
    for e, (f, w) in enumerate(zip(formats, sizes, strict=True)):
        q.gate_up_q[e] = QuantizedMatrix.from_float(torch.randn(2 * w, hidden) * 0.1, f, 32)
        q.down_q[e] = QuantizedMatrix.from_float(torch.randn(hidden, w) * 0.1, f, 32)
    if bias:
        q.gate_up_proj_bias = torch.nn.Parameter(torch.randn(len(formats), 2 * width), requires_grad=False)
        q.down_proj_bias = torch.nn.Parameter(torch.randn(len(formats), hidden), requires_grad=False)
    return q


class Fixed:
    def __init__(self, winner):
        self.winner = winner

    def __call__(self, fns):
        return {n: 0.0 if n == self.winner else 1.0 for n in fns}


@pytest.mark.parametrize("winner", ["packed", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [None, [16, 48, 32, 16]])
def test_expert_equals_dequantized_run_whatever_the_tuner_picks(monkeypatch, winner, dtype, widths):
    monkeypatch.setenv("MOEKIT_TUNE", "1")
    old = tune.set_tuner(tune.Tuner(measure=Fixed(winner), persist=False))
    try:
        q = _experts(["int8", "int4", "int4", "ternary"], widths, bias=widths is None).to(dtype)
        keys = set(q.state_dict())
        x = torch.randn(5, 64).to(dtype)
        with torch.no_grad():
            q.expert(x, 0)
        assert q._kernels
        q.float()
        assert not q._kernels  # a dtype change drops the packed cache
        q.to(dtype)
        for e in range(4):
            want = q.float().run_expert(x.float(), e).double()  # the dequantizing path, in float32
            q.to(dtype)
            got = q.expert(x, e)
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * scale * 2, rtol=TOL[dtype] * 2)
        chosen = {r["impl"] for k, r in tune.tuner().table().items() if k.startswith("qlinear")}
        assert chosen == {winner}
        assert set(q.state_dict()) == keys and q._kernels  # packed weights cached, never saved
    finally:
        tune.set_tuner(old)


def test_quantized_forward_through_dispatch_matches_dequantized_forward():
    """The module's forward (dispatch, packed kernels by default) equals qformat's own dequantizing forward."""
    q = _experts(["int4", "int8", "int4", "int4"])
    x = torch.randn(9, 64)
    idx = torch.randint(0, 4, (9, 2))
    w = torch.rand(9, 2)
    with torch.no_grad():
        got = q(x, idx, w)
        want = super(DispatchedQuantizedExperts, q).forward(x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
