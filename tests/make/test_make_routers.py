"""D2DMoE's norm-regression router with dynamic k and Read-ME's pre-gating router, on planted patterns; the
pre-gate routing a converted model (exact with every expert, reversible, the layers take its choice)."""

from __future__ import annotations

import pytest
import torch
from make_families import dense_model

import moekit.hf as mh
import moekit.make as mk
from moekit.errors import ConfigError
from moekit.make.pregate import PreGate, fit_pregate, fit_pregate_for, remove_pregate, use_pregate
from moekit.make.routers import dynamic_ffn, dynamic_k, expert_output_norms, fit_norm_router


def _planted_ffn(seed: int = 0):
    """A 32 -> 64 gated FFN whose 4 groups of 16 neurons each fire for inputs along their own direction."""
    model = dense_model("qwen3", width=64)
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T  # [4, 32] orthonormal
    owner = torch.arange(4).repeat_interleave(16)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(dirs[owner] * 3 + 0.01 * torch.randn(64, 32, generator=g))
        mlp.up_proj.weight.copy_(dirs[owner] * 3 + 0.01 * torch.randn(64, 32, generator=g))
    part = torch.stack([torch.nonzero(owner == j).flatten() for j in range(4)])
    return mlp, dirs, part


def test_dynamic_k_rules_by_hand():
    pred = torch.tensor([[6.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert dynamic_k(pred, 0.6).tolist() == [[True, False, False, False], [True, True, True, False]]
    assert dynamic_k(pred, 0.0).sum(-1).tolist() == [1, 1]  # at least one expert
    assert dynamic_k(pred, 1.0).tolist() == [[True, True, True, False], [True] * 4]  # a zero norm adds nothing
    assert dynamic_k(pred, 0.5, rule="max").tolist() == [[True, True, False, False], [True] * 4]
    with pytest.raises(ConfigError, match="tau=1.5"):
        dynamic_k(pred, 1.5)


def test_norm_router_predicts_norms_and_dynamic_k_follows_the_tokens():
    """Focused tokens lie along one group's direction, mixed tokens between two: at tau=0.8 the norm router's
    dynamic k picks the planted expert alone for the first and both planted experts for the second."""
    mlp, dirs, part = _planted_ffn()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 4, (600,), generator=g), torch.randint(0, 4, (600,), generator=g)
    b = torch.where(b == a, (a + 1) % 4, b)
    mixed = torch.arange(600) % 2 == 1
    x = torch.where(mixed[:, None], (dirs[a] + dirs[b]) / 2 ** 0.5, dirs[a]) * 1.5
    x = x + 0.02 * torch.randn(600, 32, generator=g)
    norms = expert_output_norms(mlp, part, x)
    train, test = slice(0, 400), slice(400, 600)
    router = fit_norm_router(x[train], norms[train], steps=600)
    with torch.no_grad():
        pred = router(x[test])
    resid = ((pred - norms[test]) ** 2).sum() / ((norms[test] - norms[test].mean(0)) ** 2).sum()
    assert float(resid) < 0.1  # R^2 > 0.9 on held-out tokens
    mask = dynamic_k(pred, 0.8)
    planted = torch.zeros(600, 4, dtype=torch.bool)
    planted[torch.arange(600), a] = True
    planted[mixed, b[mixed]] = True
    assert (mask == planted[test]).all(-1).float().mean() > 0.95
    k = mask.sum(-1)
    assert set(k[~mixed[test]].tolist()) == {1} and float((k[mixed[test]] == 2).float().mean()) > 0.95
    full = dynamic_ffn(mlp, part, torch.ones(200, 4, dtype=torch.bool), x[test])
    with torch.no_grad():
        assert torch.allclose(full, mlp(x[test]), atol=1e-5)  # every expert: the dense FFN


def test_pregate_learns_each_layers_planted_experts_from_token_ids():
    g = torch.Generator().manual_seed(0)
    vocab, layers, experts = 40, 3, 4
    emb = torch.randn(vocab, 16, generator=g)
    planted = torch.stack([torch.arange(vocab) % 4, (torch.arange(vocab) // 4) % 4,
                           torch.randperm(vocab, generator=g) % 4])  # [L, V]: each layer its own map
    windows = [torch.randint(0, vocab, (50,), generator=g) for _ in range(8)]
    ids = torch.cat(windows)
    masses = [torch.nn.functional.one_hot(planted[i][ids], experts).float() + 0.1 * torch.rand(400, 4, generator=g)
              for i in range(layers)]
    gate = fit_pregate(emb, windows, masses, k=1, steps=300)
    test = torch.randint(0, vocab, (2, 60), generator=g)
    chosen = gate.experts(test)  # ahead of time: every layer, from the ids alone
    assert len(chosen) == layers and chosen[0].shape == (120, 1)
    for i in range(layers):
        assert (chosen[i][:, 0] == planted[i][test.flatten()]).float().mean() > 0.95


def test_a_model_routed_by_its_pregate():
    model = dense_model("deepseek_v3", vocab=100)
    ids = torch.randint(0, 100, (2, 10))
    windows = [torch.randint(0, 100, (40,)) for _ in range(4)]
    with torch.no_grad():
        ref = model(ids).logits
        full, _ = mk.moefy(model, experts=8, k=8, partition="random", router="emoe")
        gate = fit_pregate_for(full, windows, steps=20)
        use_pregate(full, gate)
        assert torch.allclose(full(ids).logits, ref, atol=1e-4)  # every expert chosen: still the dense model
        remove_pregate(full)
        assert torch.allclose(full(ids).logits, ref, atol=1e-4)
        moe, _ = mk.moefy(model, experts=8, k=2, partition="random", router="emoe")
        own = moe(ids).logits
        gate = fit_pregate_for(moe, windows, steps=50)
        seen = []
        hooks = [b.experts.module.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
                 for b in mh.view(moe)]
        use_pregate(moe, gate)
        moe(ids)
        for h in hooks:
            h.remove()
        expected = gate.experts(ids)
        assert all(torch.equal(s.sort(-1).values, e.sort(-1).values) for s, e in zip(seen, expected, strict=True))
        with pytest.raises(ConfigError, match="already routes"):
            use_pregate(moe, gate)
        remove_pregate(moe)
        assert torch.equal(moe(ids).logits, own)
    with pytest.raises(ConfigError, match="3 layers x 8 experts; expected the model's 2 x 8"):
        use_pregate(moe, PreGate(torch.zeros(100, 32), 3, 8, 2))


def test_pregate_saved_and_loaded(tmp_path):
    model = dense_model("deepseek_v3", vocab=100)
    moe, _ = mk.moefy(model, experts=8, k=2)
    gate = fit_pregate_for(moe, [torch.randint(0, 100, (40,)) for _ in range(3)], steps=5)
    gate.save(tmp_path / "g")
    loaded = PreGate.load(tmp_path / "g", moe)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), gate(ids)) and loaded.k == 2
    with pytest.raises(ConfigError, match="not a pre-gate for this model"):
        PreGate.load(tmp_path / "g", dense_model("qwen3", vocab=120))
    with pytest.raises(ConfigError, match="not a pre-gate"):
        PreGate.load(tmp_path, moe)


def test_cli_make_with_a_pregate(tmp_path, capsys):
    from make_families import made_with_pregate
    from transformers import AutoModelForCausalLM

    from moekit.cli.main import main

    src, out, vocab = made_with_pregate(tmp_path)
    moe = AutoModelForCausalLM.from_pretrained(out)
    gate = PreGate.load(out, moe)
    assert len(gate.experts(torch.randint(0, vocab, (1, 5)))) == 2
    capsys.readouterr()
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--pregate", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pregate" in err[0] and not (tmp_path / "x").exists()
