"""ComPEFT: top-k sparsification with signs and one scale; error within the stated bounds, sizes counted right,
and the decompressed adapter loads in PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compose.conftest import DENSE_TARGETS, dense_lm
from moekit.compose.adapters import INIT_NAME, INIT_RULE, AdapterError, init_lora_a, read_adapter
from moekit.compose.compeft import (
    compress_adapter,
    compress_adapter_dir,
    compress_tensor,
    decompress_adapter,
    decompress_tensor,
    decompressed_tensors,
    golomb_bits,
    load_compressed,
    update_errors,
)


def fresh_lora(path, seed: int = 0, r: int = 4, model=None, update: float = 0.1):
    """A PEFT LoRA adapter on the tiny dense model as `moekit lora train` starts one (A from init_lora_a with its
    lora_init.json, B = 0), then moved by a random update of scale `update` (A += N(0, update²), B = N(0, update²)),
    saved at `path`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model or dense_lm(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=DENSE_TARGETS))
    record = init_lora_a(peft_model, seed)
    torch.manual_seed(seed)  # after building the model (tiny_model seeds the global generator)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p) * update)
            elif "lora_B" in name:
                p.normal_(0, update) if update else p.zero_()
    peft_model.save_pretrained(path)
    (path / INIT_NAME).write_text(json.dumps(record))
    return path


saved_lora = fresh_lora


def test_hand_computed_case():
    t = torch.tensor([[0.5, -0.1, 2.0], [-1.0, 0.05, 0.0]])
    c = compress_tensor(t, density=0.5)  # keeps 3 of 6: 2.0, -1.0, 0.5
    assert c.mask.tolist() == [True, False, True, True, False, False]
    assert c.signs.tolist() == [False, False, True]
    assert c.scale == pytest.approx((2.0 + 1.0 + 0.5) / 3)
    s = 3.5 / 3
    expected = torch.tensor([[s, 0, s], [-s, 0, 0]])
    assert torch.allclose(decompress_tensor(c), expected)
    assert c.bits() == 6 + 3 + 32 and c.original_bits() == 6 * 32


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_error_within_stated_bound(density):
    torch.manual_seed(1)
    t = torch.randn(40, 30) * torch.rand(40, 1)
    c = compress_tensor(t, density)
    err = t - decompress_tensor(c)
    assert float(err.norm()) == pytest.approx(c.error_fro, rel=1e-4, abs=1e-6)  # the identity
    assert float(err.abs().max()) <= c.bound_inf + 1e-6
    assert c.kept == round(density * t.numel())
    # the least-squares scale: any other scale on the same mask and signs does worse
    for other in (0.9 * c.scale, 1.1 * c.scale):
        c2 = compress_tensor(t, density)
        c2.scale = other
        assert float((t - decompress_tensor(c2)).norm()) > float(err.norm())


def test_golomb_bits_hand_computed():
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[0, 5, 6, 19]] = True  # gaps 0, 4, 0, 12
    # b=0: 1+5+1+13 = 20; b=1: 2+4+2+8 = 16; b=2: 3+4+3+6 = 16; b=3: 4+4+4+5 = 17; plus 5 bits for b
    assert golomb_bits(mask) == 5 + 16


def test_adapter_roundtrip_loads_in_peft(tmp_path):
    from peft import PeftModel

    src = saved_lora(tmp_path / "lora")
    adapter = read_adapter(src)
    report = compress_adapter_dir(src, tmp_path / "c", density=0.1)
    original = sum(t.numel() * 32 for t in adapter.tensors.values())
    kept = sum(round(0.1 * t.numel()) for t in adapter.tensors.values())
    bits = sum(t.numel() for t in adapter.tensors.values()) + kept + 32 * len(adapter.tensors)
    assert report["compressed_bits"] == bits
    assert report["compression_ratio"] == pytest.approx(original / bits)
    assert report["compression_ratio"] > 8  # 1 mask bit + 0.1 sign bit per fp32 entry
    raw = (tmp_path / "c" / "compeft.safetensors").read_bytes()  # the payload is the bits counted, packed
    payload = sum(-(-t.numel() // 8) + -(-round(0.1 * t.numel()) // 8) + 4 for t in adapter.tensors.values())
    assert len(raw) - 8 - int.from_bytes(raw[:8], "little") == payload
    out = decompress_adapter(tmp_path / "c", tmp_path / "d")
    expected = decompressed_tensors(compress_adapter(adapter, 0.1))
    restored = read_adapter(out)
    assert restored.init == adapter.init  # the decompressed adapter keeps its init record
    for key, t in restored.tensors.items():
        assert torch.equal(t, expected[key])
    loaded = load_compressed(tmp_path / "c")
    assert set(loaded.tensors) == set(adapter.tensors)
    model = PeftModel.from_pretrained(dense_lm(), out)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    for key, t in restored.tensors.items():
        assert torch.equal(state[key], t)
    assert math.isfinite(float(model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()))


def test_bad_input(tmp_path):
    src = saved_lora(tmp_path / "lora")
    with pytest.raises(AdapterError, match="--density=0: expected"):
        compress_adapter_dir(src, tmp_path / "c", density=0)
    with pytest.raises(AdapterError, match="is the input"):
        compress_adapter_dir(src, src, density=0.1)
    with pytest.raises(AdapterError, match="not a directory"):
        compress_adapter_dir(tmp_path / "missing", tmp_path / "c", density=0.1)
    with pytest.raises(AdapterError, match="compeft.safetensors"):
        decompress_adapter(src, tmp_path / "d")
    (src / INIT_NAME).unlink()
    with pytest.raises(AdapterError, match=f"no {INIT_NAME}.*--from-zero") as err:
        compress_adapter_dir(src, tmp_path / "c", density=0.1)
    assert "\n" not in str(err.value)
    assert compress_adapter_dir(src, tmp_path / "c", density=0.1, from_zero=True)["update"] == "A (from zero)"


def test_fused_expert_adapter_compresses_and_loads_in_peft(tmp_path):
    """LoRA on Qwen3-MoE's fused 3D expert parameters (PEFT target_parameters): ComPEFT round trip loads in PEFT
    with the reconstructed tensors; merging such adapters is refused (stacked per-expert factors)."""
    from peft import PeftModel

    from compose.conftest import moe_lm, save_random_adapter
    from moekit.compose.merge import merge_adapters

    src = save_random_adapter(moe_lm(), tmp_path / "experts", seed=0, target_parameters=["experts.gate_up_proj"])
    compress_adapter_dir(src, tmp_path / "c", density=0.2, from_zero=True)  # no init record: lora_A itself
    out = decompress_adapter(tmp_path / "c", tmp_path / "d")
    restored = read_adapter(out)
    model = PeftModel.from_pretrained(moe_lm(), out)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert restored.tensors and all(torch.equal(state[k], t) for k, t in restored.tensors.items())
    with pytest.raises(AdapterError, match="fused expert parameters"):
        merge_adapters([src, src], "sum", tmp_path / "m", model=None)


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_update_error_within_bound(tmp_path, density):
    adapter = read_adapter(saved_lora(tmp_path / "lora", seed=2))
    errors = update_errors(adapter, compress_adapter(adapter, density))
    assert len(errors) == len(adapter.modules())
    for error, bound in errors.values():
        assert 0 < error <= bound * (1 + 1e-5)


def test_std_scale_hand_computed_case():
    t = torch.tensor([[0.5, -0.1, 2.0], [-1.0, 0.05, 0.0]])
    c = compress_tensor(t, density=0.5, scale="std", alpha=2.0)
    mean = (0.5 - 0.1 + 2.0 - 1.0 + 0.05) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in (0.5, -0.1, 2.0, -1.0, 0.05, 0.0)) / 6)
    assert c.scale == pytest.approx(2.0 * std)
    assert c.mask.tolist() == [True, False, True, True, False, False]  # the same mask and signs as lsq
    s = 2.0 * std
    assert torch.allclose(decompress_tensor(c), torch.tensor([[s, 0, s], [-s, 0, 0]]))


@pytest.mark.parametrize("scale,alpha", [("lsq", 1.0), ("std", 0.5), ("std", 1.0), ("std", 3.0), ("std", 6.0)])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_error_within_stated_bound_for_both_scales(density, scale, alpha):
    torch.manual_seed(2)
    t = torch.randn(40, 30) * torch.rand(40, 1)
    c = compress_tensor(t, density, scale, alpha)
    err = t - decompress_tensor(c)
    assert float(err.norm()) == pytest.approx(c.error_fro, rel=1e-4, abs=1e-6)  # the identity, for any scale
    assert float(err.abs().max()) <= c.bound_inf + 1e-6
    lsq = compress_tensor(t, density)
    assert lsq.error_fro <= c.error_fro + 1e-9  # least squares is the best scale for the Frobenius error


def test_tune_alpha_keeps_the_closed_form_unless_an_alpha_is_better():
    from moekit.compose.adapters import LoraAdapter
    from moekit.compose.compeft import decompressed_tensors, tune_alpha

    torch.manual_seed(3)
    adapter = LoraAdapter("x", {"r": 2, "lora_alpha": 4}, {"base_model.model.l.lora_A.weight": torch.randn(2, 20),
                                                           "base_model.model.l.lora_B.weight": torch.randn(20, 2)},
                          {"rule": INIT_RULE, "seed": 0})
    original = adapter.tensors

    def fro(tensors):  # the reconstruction error: the closed form is optimal
        return sum(float((tensors[k] - original[k]).norm() ** 2) for k in original)

    chosen, info = tune_alpha(adapter, 0.25, fro, grid=(0.5, 1.0, 2.0))
    assert info["scale"] == "lsq" and info["alpha"] is None
    assert set(info["losses"]) == {"lsq", "std:0.5", "std:1", "std:2"}
    assert all(info["losses"]["lsq"] <= v for v in info["losses"].values())

    def prefers_large(tensors):  # a planted validation loss that rewards large scales
        return -sum(float(t.abs().max()) for t in tensors.values())

    chosen, info = tune_alpha(adapter, 0.25, prefers_large, grid=(0.5, 1.0, 2.0))
    assert info["scale"] == "std" and info["alpha"] == 2.0
    expected = compress_adapter(adapter, 0.25, "std", 2.0)
    assert all(torch.equal(a, b) for a, b in zip(decompressed_tensors(chosen).values(),
                                                 decompressed_tensors(expected).values(), strict=True))
    chosen, info = tune_alpha(adapter, 0.25, fro, grid=(0.5, 1.0, 2.0), keep_closed_form=False)  # the paper's
    best = min((0.5, 1.0, 2.0), key=lambda a: info["losses"][f"std:{a:g}"])
    assert info["scale"] == "std" and info["alpha"] == best
    with pytest.raises(AdapterError, match="--alpha-grid: empty"):
        tune_alpha(adapter, 0.25, fro, grid=())


def test_validation_loss_is_the_peft_models_loss(tmp_path):
    from peft import PeftModel

    from moekit.compose.compeft import tune_alpha, validation_loss
    from moekit.compose.loop import lm_loss

    src = saved_lora(tmp_path / "a")
    adapter = read_adapter(src)
    windows = torch.randint(3, 90, (4, 10))
    model = dense_lm()
    evaluate = validation_loss(model, adapter.config, windows)
    with torch.no_grad():
        want = float(lm_loss(PeftModel.from_pretrained(dense_lm(), src), windows))
    assert evaluate(adapter.tensors) == pytest.approx(want, rel=1e-5)
    assert not any("lora" in n for n, _ in model.named_parameters())  # unloaded after each call
    _, info = tune_alpha(adapter, 0.1, evaluate, grid=(1.0, 3.0))
    assert all(math.isfinite(v) for v in info["losses"].values())
    best = info["losses"]["lsq"] if info["scale"] == "lsq" else info["losses"][f"std:{info['alpha']:g}"]
    assert best == min(info["losses"].values())


def test_bad_scale():
    from moekit.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="--scale mean: unknown"):
        compress_tensor(torch.ones(4), 0.5, "mean")
    with pytest.raises(AdapterError, match="--alpha -1: expected a positive"):
        compress_tensor(torch.ones(4), 0.5, "std", -1)


def test_cli_compress_scales(tmp_path, capsys, dense_dir):
    import json

    from moekit.cli.main import main

    src = saved_lora(tmp_path / "a")
    assert main(["lora", "compress", str(src), "--density", "0.1", "--scale", "std", "--alpha", "2",
                 "--out", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == "std"
    want = compress_adapter(read_adapter(src), 0.1, "std", 2.0)
    got = load_compressed(tmp_path / "s")
    assert all(got.tensors[k].scale == pytest.approx(t.scale, rel=1e-6) for k, t in want.tensors.items())
    val = tmp_path / "val.txt"
    val.write_text("the cat sat on the mat and the dog sat on the log. " * 20)
    assert main(["lora", "compress", str(src), "--density", "0.1", "--scale", "auto", "--alpha-grid", "1,4",
                 "--data", str(val), "--model", str(dense_dir), "--seq-len", "16", "--out", str(tmp_path / "t"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["losses"]) == {"lsq", "std:1", "std:4"} and report["validation_windows"] >= 1
    chosen = report["losses"]["lsq" if report["scale"] == "lsq" else f"std:{report['alpha']:g}"]
    assert chosen == min(report["losses"].values())
    cases = [(["--scale", "auto"], "--scale auto: no --data"),
             (["--scale", "auto", "--data", str(val), "--alpha-grid", "1,x"], "--alpha-grid 1,x: expected"),
             (["--scale", "std", "--alpha", "0"], "--alpha 0.0: expected a positive"),
             (["--scale", "auto", "--data", str(val), "--model", str(dense_dir), "--seq-len", "100000"],
              "no window of 100000 tokens")]
    for extra, message in cases:
        code = main(["lora", "compress", str(src), "--out", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_freshly_initialised_adapter_has_a_zero_update(tmp_path):
    """A_init regenerates exactly from lora_init.json, so an adapter that has not moved compresses to a zero update
    and decompresses to itself; compressing lora_A itself (from zero) loses most of it."""
    adapter = read_adapter(fresh_lora(tmp_path / "lora", seed=3, update=0.0))
    for module, (a, b, _) in adapter.modules().items():
        assert torch.equal(adapter.a_init(module, tuple(a.shape)), a) and not b.any()
    c = compress_adapter(adapter, 0.05)
    assert c.report()["relative_error_fro"] == 0.0 and all(t.scale == 0.0 for t in c.tensors.values())
    assert all(torch.equal(t, adapter.tensors[k]) for k, t in decompressed_tensors(c).items())
    assert compress_adapter(adapter, 0.05, from_zero=True).report()["relative_error_fro"] > 0.5


@pytest.mark.parametrize("scale", ["lsq", "std"])
def test_update_is_compressed_not_the_initialisation(tmp_path, scale):
    """With A_init known, the error is that of compressing the update alone (A - Â = τ_A - τ̂_A), within the
    stated bounds, and far below compressing A itself at the same density."""
    adapter = read_adapter(fresh_lora(tmp_path / "lora", seed=4, update=0.01))
    c = compress_adapter(adapter, 0.1, scale, alpha=2.0)
    restored = decompressed_tensors(c)
    for key, t in c.tensors.items():
        err = adapter.tensors[key].float() - restored[key].float()
        assert float(err.norm()) == pytest.approx(t.error_fro, rel=1e-3, abs=1e-6)
        assert float(err.abs().max()) <= t.bound_inf + 1e-6
    for error, bound in update_errors(adapter, c).values():
        assert error <= bound * (1 + 1e-5)
    worse = compress_adapter(adapter, 0.1, scale, alpha=2.0, from_zero=True)
    for key in (k for k in c.tensors if ".lora_A." in k):  # ||A - Â||: the update's error against A's own
        assert c.tensors[key].error_fro < 0.5 * worse.tensors[key].error_fro
