"""MoTE: absmean ternarization on a hand-computed row, straight-through gradients, the upcycled layer is the dense
FFN plus its ternary copy at initialisation, trained ternary experts export to moekit's ternary storage, and
upcycling with training beats post-training ternarization of the FFN on its own task."""

import pytest
import torch
import torch.nn.functional as F

from moekit.compress.mote import MoTEConfig, MoTELayer, ste_ternary, ternarize
from moekit.core.experts.qformat import decode
from moekit.errors import ConfigError, ShapeError


def test_ternarize_on_a_hand_computed_row():
    w = torch.tensor([[0.9, -0.1, 0.4, -1.2]])
    s = 0.65  # mean |w|; w / s = 1.38, -0.15, 0.62, -1.85
    torch.testing.assert_close(ternarize(w, 4), torch.tensor([[s, 0.0, s, -s]]))
    two_groups = ternarize(torch.tensor([[1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), 4)
    torch.testing.assert_close(two_groups, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))


def test_straight_through_gradient():
    w = torch.randn(3, 8, requires_grad=True)
    c = torch.randn(3, 8)
    (ste_ternary(w, 4) * c).sum().backward()
    torch.testing.assert_close(w.grad, c)


def _ffn(hidden=8, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(width, hidden, generator=g) / hidden ** 0.5
    return up, torch.randn(hidden, width, generator=g) / width ** 0.5


def test_upcycled_layer_is_the_ffn_plus_its_ternary_copy():
    up, down = _ffn()
    layer = MoTELayer(up, down, MoTEConfig(num_experts=4, k=2, group_size=8))
    x = torch.randn(10, 8)
    with torch.no_grad():
        y, routing = layer(x)
    dense = F.gelu(x @ up.T) @ down.T
    ternary = F.gelu(x @ ternarize(up, 8).T) @ ternarize(down, 8).T
    torch.testing.assert_close(y, dense + ternary, atol=1e-5, rtol=1e-5)  # k weights sum to 1, copies identical
    assert not layer.shared_up.requires_grad and layer.up.requires_grad


def test_trained_experts_export_to_the_ternary_format():
    up, down = _ffn()
    layer = MoTELayer(up, down, MoTEConfig(group_size=8), noise=0.1, generator=torch.Generator().manual_seed(1))
    packed = layer.export_ternary()
    codes, scale = packed["up"][2]
    got = decode(codes, scale, "ternary", 8, torch.float32)
    torch.testing.assert_close(got, ternarize(layer.up[2].detach(), 8), atol=1e-3, rtol=1e-3)  # fp16 scales


def test_upcycling_and_training_beats_post_training_ternary_on_the_task():
    """A dense FFN fitted to a teacher; its post-training ternary version loses accuracy; MoTE (FFN shared in full
    precision + ternary routed experts, 150 steps) ends well below the ternary FFN's error and near the FFN's."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    x, x_test = torch.randn(512, 8), torch.randn(512, 8)
    with torch.no_grad():
        t, t_test = teacher(x), teacher(x_test)
    up, down = (torch.nn.Parameter(w.clone()) for w in _ffn(width=32))
    opt = torch.optim.Adam([up, down], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(F.gelu(x @ up.T) @ down.T, t).backward()
        opt.step()
    with torch.no_grad():
        dense_err = F.mse_loss(F.gelu(x_test @ up.T) @ down.T, t_test)
        ptq_err = F.mse_loss(F.gelu(x_test @ ternarize(up, 8).T) @ ternarize(down, 8).T, t_test)
    layer = MoTELayer(up.detach(), down.detach(), MoTEConfig(num_experts=4, k=1, group_size=8), noise=0.05,
                      generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(layer(x)[0], t).backward()
        opt.step()
    with torch.no_grad():
        mote_err = F.mse_loss(layer(x_test)[0], t_test)
    # measured: dense 0.0047, post-training ternary 0.038, MoTE 0.0053
    assert float(mote_err) < 0.5 * float(ptq_err), (float(mote_err), float(ptq_err), float(dense_err))
    assert float(mote_err) < 1.5 * float(dense_err), (float(mote_err), float(dense_err))


def test_bad_config():
    up, down = _ffn()
    with pytest.raises(ConfigError, match="k="):
        MoTELayer(up, down, MoTEConfig(num_experts=2, k=3))
    with pytest.raises(ConfigError, match="group_size"):
        MoTELayer(up, down, MoTEConfig(group_size=6))
    with pytest.raises(ShapeError, match="down"):
        MoTELayer(up, up)
