"""RaggedExperts (experts of different widths, packed) against a per-token reference at each expert's own width;
indices outside [0, E) mean no expert; the forward never builds the zero-padded layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.core.experts.ragged import RaggedExperts, glu


def _reference(m: RaggedExperts, x, idx, w):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < m.num_experts:
                continue
            gate_up, down, bias = (p.double() if p is not None else None for p in m.parts(e))
            h = gate_up @ x[t].double() + (0 if bias is None else bias)
            a = glu(h[: m.widths[e]], h[m.widths[e]:], torch.nn.functional.silu, m.gpt_oss)
            y = down @ a + (0 if m.down_proj_bias is None else m.down_proj_bias[e].double())
            out[t] += float(w[t, j]) * y
    return out


@given(widths=st.lists(st.integers(0, 12), min_size=1, max_size=6), tokens=st.integers(1, 12),
       k=st.integers(1, 3), gpt_oss=st.booleans(), seed=st.integers(0, 99))
def test_ragged_forward_matches_reference(widths, tokens, k, gpt_oss, seed):
    torch.manual_seed(seed)
    m = RaggedExperts(widths, 8, torch.nn.SiLU(), gpt_oss=(1.702, 7.0) if gpt_oss else None)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(tokens, 8)
    idx = torch.randint(-1, len(widths) + 1, (tokens, k))  # -1 and E: no expert
    w = torch.rand(tokens, k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RaggedExperts, "_padded_gate_up", lambda *_: pytest.fail("forward built the padded layout"))
        with torch.no_grad():
            got = m(x, idx, w)
    torch.testing.assert_close(got.double(), _reference(m, x, idx, w), atol=1e-4, rtol=1e-4)
