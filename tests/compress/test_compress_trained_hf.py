"""`moekit compress --method mote / compressed-experts` on tiny transformers MoE checkpoints (Qwen3-MoE, and
DeepSeek-V3 with a shared expert and unsorted top-k slots): the compressed-experts forward on a hand-assembled
case, the ternary training rule against post-training ternary, outputs that load and reproduce the in-memory
model, evaluation in the report, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.cli.main import main
from moekit.compress import calibrate
from moekit.compress.compressed_hf import (
    CompressedHFExperts,
    compress_experts,
    install,
    load_compressed,
)
from moekit.compress.mote_hf import ternary_as_stored, train_block
from moekit.compress.quantize import apply_quant, plan_quant
from moekit.compress.run import compress_checkpoint
from moekit.core.experts.qformat import QuantizedExperts
from moekit.default import DEFAULT_MODEL_DIR, default_test_split
from moekit.errors import ConfigError


def _windows(vocab: int, n: int = 4, length: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, vocab, (length,), generator=g), None) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for family in ("qwen3_moe", "deepseek_v3"):
        mh.save(tiny_model(family, vocab_size=4096), root / family)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEFAULT_MODEL_DIR / name, root / family / name)
    docs = default_test_split()
    cal = [{**d, "text": d["text"][:1200]} for d in docs[:3]]
    held = [{**d, "text": d["text"][:600]} for d in docs[3:5]]
    (root / "cal.jsonl").write_text("\n".join(json.dumps(d) for d in cal))
    (root / "held.jsonl").write_text("\n".join(json.dumps(d) for d in held))
    return root


def test_compressed_forward_on_a_hand_assembled_case():
    """k = 2, keep = 1 on DeepSeek-V3 (top-k slots unsorted): per token, the heavier slot's expert in full, the
    lighter slot's expert through B A x + c + D gelu(U x), both times the routing weight, summed by hand."""
    model = tiny_model("deepseek_v3")
    block = mh.view(model)[0]
    e, h, r = block.num_experts, block.experts.hidden_size, 3
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(e, *shape, generator=g) for n, shape in
              (("a", (r, h)), ("b", (h, r)), ("c", (h,)), ("u", (r, h)), ("d", (h, r)))}
    x = torch.randn(7, h, generator=g)
    idx = torch.tensor([[0, 1], [2, 5], [4, 3], [1, 0], [5, 2], [3, 3], [0, 4]])
    w = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.6], [0.9, 0.1], [0.4, 0.45], [0.3, 0.2], [0.6, 0.35]])
    with torch.no_grad():
        expect = torch.zeros(7, h)
        for t in range(7):
            heavy = int(w[t].argmax())
            for s in range(2):
                i = int(idx[t, s])
                if s == heavy:
                    y = block.experts.expert(x[t:t + 1], i)[0]
                else:
                    p = {n: v[i] for n, v in params.items()}
                    y = p["b"] @ (p["a"] @ x[t]) + p["c"] + p["d"] @ F.gelu(p["u"] @ x[t])
                expect[t] += w[t, s] * y
        wrapper = install(block, 1, params)
        got = wrapper(x, idx, w)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert isinstance(mh.view(model)[0].experts.module, CompressedHFExperts)
    assert mh.view(model)[0].experts.gate_up_proj is wrapper.inner.gate_up_proj  # view still sees the experts


def test_compressed_experts_fit_beats_the_mean_baseline_and_keep_one_changes_only_auxiliary_slots():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, _windows(97), progress=False)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    summary = compress_experts(model, stats, keep=1, rank=4, steps=50, progress=False)
    for layer in summary["layers"].values():
        assert layer["compressed_mse"] < 0.8 * layer["mean_mse"]  # about 0.7 here: random experts are near-quadratic
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.equal(before, after)
    for b in mh.view(model):  # a keep of k would leave every selection full: the model before
        b.experts.module.keep = b.k
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_mote_training_beats_post_training_ternary_and_is_what_is_stored():
    """Step 0 is post-training ternary; training lowers the block's error to the full-precision block; the
    weights written back ternarize (as stored) to what the training saw."""
    model = tiny_model("deepseek_v3")
    stats = calibrate(model, _windows(97), progress=False)
    block = mh.view(model)[0]
    x = stats.layers[0].x.unsqueeze(0)
    with torch.no_grad():
        full = block.block(x)
    res = train_block(block, x[0], steps=60, lr=0.01, group_size=8)
    assert res["mote_mse"] < 0.8 * res["ptq_mse"]
    apply_quant(model, plan_quant(model, None, "ternary", 8))  # store the trained experts ternary
    with torch.no_grad():
        stored = mh.view(model)[0].block(x)
    assert float((stored - full).square().mean()) == pytest.approx(res["mote_mse"], rel=1e-3)
    row = torch.tensor([[0.9, -0.1, 0.4, -1.2, 0.3, 0.0]])  # group 4: s = 0.65 then (0.3 + 0) / 2 = 0.15
    s1, s2 = torch.tensor(0.65).half().float(), torch.tensor(0.15).half().float()
    torch.testing.assert_close(ternary_as_stored(row, 4), torch.tensor([[s1, 0, s1, -s1, s2, 0]]))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_cli_mote_writes_a_loadable_ternary_checkpoint(setup, capsys, family):
    out = setup / f"mote-{family}"
    code = main(["compress", str(setup / family), "--method", "mote", "--steps", "20", "--data",
                 str(setup / "cal.jsonl"), "--eval-data", str(setup / "held.jsonl"), "--cal-tokens", "512",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "moekit-manifest" and report["ppl_after"] is not None
    assert report["bytes_after"] < report["bytes_before"]
    for layer in report["trained"]["layers"].values():
        assert layer["mote_mse"] < layer["ptq_mse"]
    loaded = mh.load(out)
    assert all(isinstance(b.experts.module, QuantizedExperts) for b in mh.view(loaded))
    assert json.loads((out / "quant_plan.json").read_text())["spec"] == "ternary"


def test_cli_compressed_experts_native_plus_sidecar_reproduces_the_model(setup):
    out = setup / "ce"
    report = compress_checkpoint(str(setup / "qwen3_moe"), out, "compressed-experts", data=[str(setup / "cal.jsonl")],
                                 eval_data=[str(setup / "held.jsonl")], cal_tokens=512, keep=1, rank=4, steps=30,
                                 progress=False)
    assert report["layout"] == "native" and report["ppl_after"] is not None
    assert report["active_params_after"] < report["active_params_before"]
    # every full expert is kept, and beside it its compressed form: a, u [4, 40], b, d [40, 4], c [40]
    assert report["params_after"] == report["params_before"] + 2 * 6 * (4 * 4 * 40 + 40)
    k_minus_keep, expert = 1, 3 * 20 * 40  # Qwen3-MoE tiny: k = 2, experts of width 20 on hidden 40, 2 layers
    saved = 2 * k_minus_keep * (expert - (4 * 4 * 40 + 40))
    assert report["active_params_before"] - report["active_params_after"] == saved
    plain = mh.load(out)  # plain transformers: the uncompressed model, as before
    original = mh.load(setup / "qwen3_moe")
    ids = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, original(input_ids=ids).logits)
        compressed = load_compressed(plain, out)(input_ids=ids).logits
    assert not torch.allclose(compressed, original(input_ids=ids).logits)
    # the evaluation measured this very model: its perplexity on the held-out text is the report's
    from moekit.compress.run import _held_out, _ppl
    from moekit.data import read_documents
    from moekit.eval import load_model_and_tokenizer

    _, _, tok, _ = load_model_and_tokenizer(str(out))
    docs = _held_out([str(setup / "held.jsonl")], False, read_documents([str(setup / "cal.jsonl")]))
    assert _ppl(plain, tok, docs, 16384)["ppl"] == pytest.approx(report["ppl_after"], rel=1e-4)


@pytest.mark.parametrize(("args", "needle"), [
    (["--method", "mote", "--ratio", "0.5"], "takes no --ratio"),
    (["--method", "mote", "--keep", "1"], "--keep"),
    (["--method", "mote", "--task", "code"], "--task"),
    (["--method", "frequency", "--ratio", "0.5", "--steps", "3"], "--steps"),
    (["--method", "compressed-experts", "--keep", "2"], "--keep 2"),
    (["--method", "compressed-experts", "--rank", "0"], "--rank 0"),
])
def test_cli_refusals(setup, capsys, args, needle):
    code = main(["compress", str(setup / "qwen3_moe"), *args, "--data", str(setup / "cal.jsonl"), "--cal-tokens",
                 "256", "--out", str(setup / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("moekit compress: error:")  # one line (after any loading bar)
    assert not (setup / "refused").exists()


def test_keep_must_leave_an_auxiliary_expert():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, _windows(97, n=1), progress=False)
    with pytest.raises(ConfigError, match="--keep 2"):
        compress_experts(model, stats, keep=2, progress=False)
