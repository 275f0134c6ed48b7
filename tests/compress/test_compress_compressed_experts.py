"""Compressed experts: the auxiliary (lower-ranked) experts replaced by fitted rank-r maps stay closer to the full
layer than dropping them or using their mean output, at fewer active parameters; the kept experts run exactly."""

import pytest
import torch

from moekit import MoE
from moekit.compress.compressed_experts import CompressedExpertsConfig, CompressedMoE
from moekit.errors import ConfigError
from reference import ref_moe


def _layer():
    torch.manual_seed(0)
    moe = MoE(16, 32, 8, k=2).eval()
    with torch.no_grad():
        moe.router.weight.mul_(0.3)  # flatter routing: the second expert's weight matters
    return moe


def test_compressed_auxiliary_experts_beat_dropping_them_and_their_mean():
    moe = _layer()
    cal, test = torch.randn(512, 16), torch.randn(512, 16)
    cm = CompressedMoE(moe, CompressedExpertsConfig(keep=1, rank=8, steps=100, lr=2e-2))
    cm.fit(cal)
    with torch.no_grad():
        full = moe(test).hidden
        err = {m: float((cm(test, m) - full).square().mean() / full.square().mean())
               for m in ("compressed", "drop", "mean")}
    # measured: relative error 0.29 compressed, 0.46 dropped, 0.44 mean output; random experts have no redundancy
    # to exploit, so this checks the mechanism, not the paper's "over 90% recovered" on trained models
    assert err["compressed"] < 0.7 * err["drop"] and err["compressed"] < 0.7 * err["mean"], err
    active = cm.active_parameters()
    assert active["compressed"] < 0.75 * active["full"]


def test_kept_experts_run_exactly():
    moe = _layer()
    cm = CompressedMoE(moe, CompressedExpertsConfig(keep=1, rank=4))
    x = torch.randn(40, 16)
    with torch.no_grad():
        r = moe.router(x)
        got = cm(x, "drop")
    want = ref_moe(x, r.indices[:, :1], r.weights[:, :1].double(), moe.experts)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bad_config():
    moe = _layer()
    with pytest.raises(ConfigError, match="keep"):
        CompressedMoE(moe, CompressedExpertsConfig(keep=2))
    with pytest.raises(ConfigError, match="rank"):
        CompressedMoE(moe, CompressedExpertsConfig(rank=0))
    with pytest.raises(ConfigError, match="mode"):
        CompressedMoE(moe, CompressedExpertsConfig())(torch.randn(2, 16), "zero")
