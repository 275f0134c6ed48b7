"""Merging adapters: Orthogonal Adaptation's sum is exact on each adapter's subspace; merged adapters load in PEFT and
act as the summed update; PEFT's add_weighted_adapter baselines; Composable Sparse Fine-Tuning; bad input."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from compose.conftest import DENSE_TARGETS, dense_lm, moe_lm
from compose.test_compose_compeft import saved_lora
from hf.tiny import tiny_model
from moekit.cli.main import main
from moekit.compose.adapters import AdapterError, read_adapter
from moekit.compose.merge import (
    make_orthogonal,
    merge_adapters,
    merged_delta,
    orthogonal_rows,
    sum_adapters,
    train_orthogonal_lora,
)
from moekit.compose.sparse_ft import apply_sparse, load_sparse, save_sparse, sparse_fine_tune
from moekit.errors import UnknownNameError

MODULE = "base_model.model.model.layers.0.self_attn.o_proj"


def orthogonal_lora(path, slot: int, slots: int = 2, r: int = 4, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(dense_lm(), LoraConfig(r=r, lora_alpha=r, target_modules=DENSE_TARGETS))
    make_orthogonal(peft_model, slot, slots, seed=7)
    torch.manual_seed(seed + slot)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_A" in n)
    peft_model.save_pretrained(path)
    return path


def test_orthogonal_rows():
    a0, a1 = orthogonal_rows(16, 4, 0, 3, seed=1), orthogonal_rows(16, 4, 1, 3, seed=1)
    assert torch.allclose(a0 @ a0.T, torch.eye(4), atol=1e-6)
    assert torch.allclose(a0 @ a1.T, torch.zeros(4, 4), atol=1e-6)
    with pytest.raises(AdapterError, match="need 16 directions"):
        orthogonal_rows(12, 4, 0, 4, seed=1)


def test_orthogonal_sum_exact_on_subspaces(tmp_path):
    paths = [orthogonal_lora(tmp_path / f"o{i}", i) for i in range(2)]
    adapters = [read_adapter(p) for p in paths]
    config, tensors = sum_adapters(adapters)
    for module in adapters[0].modules():
        merged = merged_delta(config, tensors, module)
        for a in adapters:
            a_i, _, _ = a.modules()[module]
            x = a_i.T @ torch.randn(a_i.shape[0], 5)  # inputs in adapter i's subspace
            assert torch.allclose(merged @ x, a.deltas()[module] @ x, atol=1e-5)
    # the same sum of adapters with random (non-orthogonal) A interferes: not exact
    plain = [read_adapter(saved_lora(tmp_path / f"p{i}", seed=i)) for i in range(2)]
    config, tensors = sum_adapters(plain)
    a_0 = plain[0].modules()[MODULE][0]
    x = a_0.T @ torch.randn(a_0.shape[0], 5)
    assert not torch.allclose(merged_delta(config, tensors, MODULE) @ x, plain[0].deltas()[MODULE] @ x, atol=1e-3)


def _with_delta(model: nn.Module, adapters, weights=(1.0, 1.0)) -> nn.Module:
    named = dict(model.named_modules())
    with torch.no_grad():
        for a, w in zip(adapters, weights, strict=True):
            for module, delta in a.deltas().items():
                named[module.removeprefix("base_model.model.")].weight += w * delta
    return model


@pytest.mark.parametrize("method", ["sum", "cat"])
def test_exact_merges_load_in_peft_and_equal_the_sum(tmp_path, dense_dir, method):
    from peft import PeftModel

    paths = [saved_lora(tmp_path / f"a{i}", seed=i, r=2 + 2 * i) for i in range(2)]  # ranks 2 and 4
    report = merge_adapters(paths, method, tmp_path / "m", model=dense_dir, weights=[1.0, 0.5])
    assert report["rank"] == 6
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    merged = PeftModel.from_pretrained(dense_lm(vocab_size=dense_dir_vocab(dense_dir)), tmp_path / "m").eval()
    reference = _with_delta(dense_lm(vocab_size=dense_dir_vocab(dense_dir)), [read_adapter(p) for p in paths],
                            (1.0, 0.5))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)


def dense_dir_vocab(path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "svd"])
def test_peft_baselines_load_in_peft(tmp_path, dense_dir, method):
    from peft import PeftModel

    paths = [saved_lora(tmp_path / f"a{i}", seed=i) for i in range(2)]
    report = merge_adapters(paths, method, tmp_path / "m", model=dense_dir, density=0.5)
    assert report["rank"] == 4 and report["method"] == method
    merged = PeftModel.from_pretrained(dense_lm(vocab_size=dense_dir_vocab(dense_dir)), tmp_path / "m")
    delta = read_adapter(tmp_path / "m").deltas()[MODULE]
    assert float(delta.abs().sum()) > 0
    assert torch.isfinite(merged(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_bad_input(tmp_path, dense_dir):
    a = saved_lora(tmp_path / "a", r=4)
    b = saved_lora(tmp_path / "b", r=2, seed=1)
    with pytest.raises(UnknownNameError, match="--method avg: unknown merge method"):
        merge_adapters([a, b], "avg", tmp_path / "m", model=dense_dir)
    with pytest.raises(AdapterError, match="empty adapter pool"):
        merge_adapters([], "sum", tmp_path / "m", model=dense_dir)
    with pytest.raises(AdapterError, match="rank r=2.*expected one rank"):
        merge_adapters([a, b], "linear", tmp_path / "m", model=dense_dir)
    from peft import LoraConfig, get_peft_model

    get_peft_model(moe_lm(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "q")
    with pytest.raises(AdapterError, match="q_proj does not exist in"):
        merge_adapters([a, tmp_path / "q"], "sum", tmp_path / "m", model=dense_dir)
    wide = tiny_model("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=2, hidden_size=48)
    saved_lora(tmp_path / "w", model=wide)
    with pytest.raises(AdapterError, match="expected adapters of one base model"):
        merge_adapters([a, tmp_path / "w"], "sum", tmp_path / "m", model=dense_dir)
    with pytest.raises(AdapterError, match="expected an adapter trained on this base model"):
        merge_adapters([tmp_path / "w"], "sum", tmp_path / "m", model=dense_dir)
    assert not (tmp_path / "m").exists()


def test_orthogonal_training_trains_b_only(tmp_path):
    model = dense_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(3, 90, (8, 12))
    report = train_orthogonal_lora(model, windows, tmp_path / "o", 1, 2, DENSE_TARGETS, rank=2, steps=2,
                                   progress=False)
    assert report["layers"] == 2 * len(DENSE_TARGETS)
    adapter = read_adapter(tmp_path / "o")
    for _a, b, _ in adapter.modules().values():
        assert float(b.abs().sum()) > 0  # B trained away from its zero start
    a_mod, _, _ = adapter.modules()[MODULE]
    assert torch.allclose(a_mod, orthogonal_rows(a_mod.shape[1], 2, 1, 2, zlib.crc32(MODULE.encode())), atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparse_fine_tuning_selects_moved_entries_and_composes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    x = torch.zeros(16, 6)
    x[:, :2] = torch.randn(16, 2)  # only input features 0 and 1 carry signal: only columns 0, 1 get gradients
    target = torch.randn(16, 4)
    theta0 = model[0].weight.detach().clone()

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    diff = sparse_fine_tune(model, [(x, target)], ["0.weight"], density=8 / 24, steps=5, lr=0.05, loss_fn=loss_fn)
    idx, val = diff["0.weight"]
    assert len(idx) == 8 and set((idx % 6).tolist()) == {0, 1}  # the 8 moved entries: columns 0 and 1
    assert torch.equal(model[0].weight, theta0)  # the model is left at θ0
    other = {"0.weight": (torch.tensor([5, 11]), torch.tensor([1.0, -2.0]))}
    apply_sparse(model, [diff, other])
    expected = theta0.clone().view(-1)
    expected[idx] += val
    expected[torch.tensor([5, 11])] += torch.tensor([1.0, -2.0])
    assert torch.allclose(model[0].weight.view(-1), expected)
    apply_sparse(model, [diff, other], sign=-1.0)
    assert torch.allclose(model[0].weight, theta0, atol=1e-6)
    save_sparse(diff, tmp_path / "d.safetensors")
    loaded = load_sparse(tmp_path / "d.safetensors")
    assert torch.equal(loaded["0.weight"][0], idx) and torch.equal(loaded["0.weight"][1], val)


def test_cli_merge(tmp_path, dense_dir, capsys):
    import json

    a, b = saved_lora(tmp_path / "a"), saved_lora(tmp_path / "b", seed=1)
    assert main(["lora", "merge", str(a), str(b), "--method", "ties", "--model", str(dense_dir),
                 "--out", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ties"
    assert main(["lora", "merge", str(a), "--method", "mean", "--model", str(dense_dir),
                 "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown merge method" in err and "Traceback" not in err
    from peft import LoraConfig, get_peft_model

    small = saved_lora(tmp_path / "small", r=2)
    get_peft_model(moe_lm(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "q")
    capsys.readouterr()
    for argv, message in [([str(a), str(small), "--method", "ties"], "rank r=2"),
                          (["--method", "sum"], "empty adapter pool"),
                          ([str(a), str(tmp_path / "q"), "--method", "sum"], "q_proj does not exist in"),
                          ([str(a), str(b), "--method", "sum", "--weight", "1"], "2 adapters; expected one per")]:
        assert main(["lora", "merge", *argv, "--model", str(dense_dir), "--out", str(tmp_path / "n")]) == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
        assert len(lines) == 1 and message in lines[0], (argv, lines)
    assert not (tmp_path / "n").exists()
    assert main(["lora", "compress", str(a), "--density", "0.1", "--out", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compression_ratio"] > 8
    assert main(["lora", "compress", str(a), "--density", "2", "--out", str(tmp_path / "d")]) == 2
    assert "--density=2.0: expected" in capsys.readouterr().err


def test_sum_of_adapters_on_different_modules_loads_in_peft(tmp_path, dense_dir):
    """Union of targets: o_proj in both (ranks 4 + 2), q_a_proj in one (rank 2): per-module ranks in rank_pattern."""
    from peft import PeftModel

    from compose.conftest import save_random_adapter

    vocab = dense_dir_vocab(dense_dir)
    a = save_random_adapter(dense_lm(vocab_size=vocab), tmp_path / "a", seed=0, r=4, targets=["o_proj"])
    b = save_random_adapter(dense_lm(vocab_size=vocab), tmp_path / "b", seed=1, r=2, targets=["o_proj", "q_a_proj"])
    report = merge_adapters([a, b], "sum", tmp_path / "m", model=dense_dir)
    merged = read_adapter(tmp_path / "m")
    ranks = {m: t[0].shape[0] for m, t in merged.modules().items()}
    assert sorted(set(ranks.values())) == [2, 6] and report["rank"] == 6
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(dense_lm(vocab_size=vocab), tmp_path / "m")(input_ids=ids).logits
        want = _with_delta(dense_lm(vocab_size=vocab), [read_adapter(a), read_adapter(b)])(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
