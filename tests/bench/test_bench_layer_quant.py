"""The quantized contenders of `moekit bench layer` compute the layer's function (same router, same experts up to
the format's error) without touching the unquantized layer."""

from __future__ import annotations

import pytest
import torch

from moekit.bench.layer import CASES, _moekit_layer, _quantized_layer


@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("int4", 0.25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_contender_is_the_same_layer(fmt, tol, dtype):
    case = CASES[0].scaled(16)
    torch.manual_seed(0)
    moe = _moekit_layer(case, dtype)
    experts = moe.experts
    q = _quantized_layer(moe, fmt)
    assert moe.experts is experts and q.router is moe.router and q.experts is not experts
    x = torch.randn(1, 24, case.hidden, dtype=dtype)
    with torch.no_grad():
        want, got = moe(x).hidden.float(), q(x).hidden.float()
    assert got.dtype == torch.float32 and float((got - want).norm() / want.norm()) < tol
