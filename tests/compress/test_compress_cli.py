"""`moekit compress`: writes checkpoint, plan.json and report.json; never changes the input (hashes); refuses an
output that is the input or not empty (without --force); an interrupted run leaves nothing; bad input is one
line on stderr and exit code 2; too little calibration text warns with the count and goes on."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.cli.main import main
from moekit.compress.plan import Plan
from moekit.compress.run import compress_checkpoint
from moekit.default import DEFAULT_MODEL_DIR, default_test_split
from moekit.hf.info import describe


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint with moekit-tiny's tokenizer, calibration and held-out data files."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("qwen3_moe", vocab_size=4096)
    mh.save(model, root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, root / "model" / name)
    docs = default_test_split()
    code = [d for d in docs if d["domain"] == "code"]
    prose = [d for d in docs if d["domain"] == "prose"]
    cal = [{**d, "text": d["text"][:1500]} for d in code[:2] + prose[:2]]
    held = [{**d, "text": d["text"][:800]} for d in code[2:4] + prose[2:4]]
    (root / "cal.jsonl").write_text("\n".join(json.dumps(d) for d in cal))
    (root / "held.jsonl").write_text("\n".join(json.dumps(d) for d in held))
    (root / "short.txt").write_text("a few words")
    return root


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("method", "layout"), [("frequency", "native"), ("heapr", "moekit-manifest")])
def test_compress_writes_checkpoint_plan_and_report(setup, capsys, method, layout):
    before = _hashes(setup / "model")
    out = setup / f"out-{method}"
    code, _, err = _run(["compress", str(setup / "model"), "--method", method, "--ratio", "0.5", "--data",
                         str(setup / "cal.jsonl"), "--eval-data", str(setup / "held.jsonl"), "--out", str(out)],
                        capsys)
    assert code == 0, err
    assert _hashes(setup / "model") == before
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == layout
    for key in ("bytes_before", "bytes_after", "params_before", "params_after", "ppl_before", "ppl_after",
                "experts_per_layer", "active_params_after", "experts_per_token"):
        assert report[key] is not None, key
    expert_bytes = 2 * 6 * 3 * 20 * 40 * 4  # layers * experts * (gate, up, down) * I * H * float32
    assert report["bytes_before"] - report["bytes_after"] == pytest.approx(expert_bytes / 2, rel=0.1)
    assert report["params_after"] < report["params_before"]
    assert set(report["ppl_domains_after"]) == {"code", "prose"}
    assert Plan.load(out / "plan.json").method == method
    assert _hashes(out)["tokenizer.json"] == before["tokenizer.json"]  # the output runs on its own
    loaded = mh.load(out)
    assert [b.num_experts for b in mh.view(loaded)] == list(report["experts_per_layer"].values())
    info = describe(out)  # moekit info counts what the report counts
    assert (info["total_params"], info["active_params"]) == (report["params_after"], report["active_params_after"])
    if method == "frequency":
        assert report["experts_per_layer"] == {"0": 3, "1": 3}


def test_default_model_is_unchanged_after_compress(setup, capsys):
    before = _hashes(DEFAULT_MODEL_DIR)
    code, _, err = _run(["compress", "--method", "frequency", "--ratio", "0.25", "--data", str(setup / "cal.jsonl"),
                         "--cal-tokens", "512", "--eval-tokens", "256", "--out", str(setup / "tiny-out")], capsys)
    assert code == 0, err
    assert _hashes(DEFAULT_MODEL_DIR) == before
    report = json.loads((setup / "tiny-out" / "report.json").read_text())
    experts = [b.num_experts for b in mh.view(mh.load(DEFAULT_MODEL_DIR))]
    assert report["experts_per_layer"] == {str(i): e - round(0.25 * e) for i, e in enumerate(experts)}
    assert report["evaluation"]["files"] == "moekit-tiny held-out split"


def test_compress_heapr_then_quant_drops_bytes_for_both_steps(setup, capsys):
    """heapr + int4 used to write exactly int4's bytes (the removed neurons quantized back, padded); now each step
    drops bytes, and mixed: after heapr keeps to its budget at the experts' own widths."""
    base = ["compress", str(setup / "model"), "--data", str(setup / "cal.jsonl"), "--eval-data",
            str(setup / "held.jsonl")]
    heapr = ["--method", "heapr", "--ratio", "0.5"]
    reports, quant_plans = {}, {}
    for name, args in (("int4", ["--quant", "int4"]), ("heapr-int4", [*heapr, "--quant", "int4"]),
                       ("heapr-mixed", [*heapr, "--quant", "mixed:9000"])):
        out = setup / f"out-{name}"
        code, _, err = _run([*base, *args, "--out", str(out)], capsys)
        assert code == 0, err
        reports[name] = json.loads((out / "report.json").read_text())
        quant_plans[name] = json.loads((out / "quant_plan.json").read_text())
        info = describe(out)
        assert (info["total_params"], info["active_params"]) == \
            (reports[name]["params_after"], reports[name]["active_params_after"])
        assert reports[name]["ppl_after"] is not None
    assert reports["heapr-int4"]["bytes_after"] < reports["int4"]["bytes_after"]
    assert quant_plans["heapr-int4"]["expert_bytes"] < quant_plans["int4"]["expert_bytes"]
    assert quant_plans["heapr-mixed"]["expert_bytes"] <= 9000 < quant_plans["heapr-int4"]["expert_bytes"]


def test_output_that_is_the_input_or_not_empty_is_refused(setup, capsys):
    before = _hashes(setup / "model")
    base = ["compress", str(setup / "model"), "--method", "frequency", "--ratio", "0.5", "--data",
            str(setup / "cal.jsonl")]
    for out in (setup / "model", setup / "model" / "sub"):
        code, _, err = _run([*base, "--out", str(out)], capsys)
        assert code == 2 and "input checkpoint" in err and err.count("\n") == 1
    busy = setup / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = _run([*base, "--out", str(busy)], capsys)
    assert code == 2 and "not empty" in err
    assert (busy / "keep.txt").read_text() == "mine"
    code, _, err = _run([*base, "--out", str(busy), "--force"], capsys)
    assert code == 0, err
    assert not (busy / "keep.txt").exists() and (busy / "report.json").exists()
    assert _hashes(setup / "model") == before


def test_an_interrupted_run_leaves_no_checkpoint(setup, monkeypatch):
    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Plan, "save", interrupted)
    out = setup / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(str(setup / "model"), out, "frequency", 0.5, data=[str(setup / "cal.jsonl")],
                            progress=False)
    assert not out.exists()
    assert not [p for p in setup.iterdir() if p.name.startswith(".interrupted")]


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "frequency", "--ratio", "0", "--data", "cal.jsonl"], "--ratio=0.0: expected a fraction"),
    (["--method", "frequency", "--ratio", "1.2", "--data", "cal.jsonl"], "--ratio=1.2: expected a fraction"),
    (["--method", "msmoe", "--ratio", "0.5"], "--data: method msmoe needs calibration data"),
    (["--ratio", "0.5"], "--method / --quant"),
    (["--quant", "int8", "--protect-super"], "--protect-super: protects experts from a --method"),
    (["--method", "frequency", "--ratio", "0.5", "--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_is_one_line_and_exit_2(setup, capsys, extra, message):
    extra = [str(setup / e) if e.endswith(".jsonl") else e for e in extra]
    code, _, err = _run(["compress", str(setup / "model"), *extra, "--out", str(setup / "bad")], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (setup / "bad").exists()


def test_too_little_calibration_text_warns_with_the_count(setup, capsys):
    code, _, err = _run(["compress", str(setup / "model"), "--method", "frequency", "--ratio", "0.5", "--data",
                         str(setup / "short.txt"), "--out", str(setup / "short-out")], capsys)
    assert code == 0
    assert "warning: calibration data: " in err and "experts never selected" in err
    assert json.loads((setup / "short-out" / "report.json").read_text())["warnings"]


def test_eval_cli_prints_perplexity_per_domain(setup, capsys):
    code, out, err = _run(["eval", str(setup / "model"), "--data", str(setup / "held.jsonl"), "--seq-len", "64"],
                          capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["domains"]) == {"code", "prose"}
    assert result["tokens"] == sum(d["tokens"] for d in result["domains"].values())
    assert torch.isfinite(torch.tensor(result["ppl"]))


def test_prune_then_quantize(setup, capsys):
    out = setup / "quant-out"
    code, _, err = _run(["compress", str(setup / "model"), "--method", "frequency", "--ratio", "0.5", "--quant",
                         "int8", "--data", str(setup / "cal.jsonl"), "--eval-data", str(setup / "held.jsonl"),
                         "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    pruned = json.loads((setup / "out-frequency" / "report.json").read_text())
    assert report["quant"] == "int8" and (out / "quant_plan.json").exists()
    # int8 codes (1 byte) plus a scale per 40 inputs instead of float32 (4 bytes) for the remaining experts
    assert report["bytes_after"] < pruned["bytes_after"] - 0.6 * (2 * 3 * 3 * 20 * 40 * 4)
    assert report["ppl_after"] == pytest.approx(pruned["ppl_after"], rel=0.05)
    with torch.no_grad():
        assert torch.isfinite(mh.load(out)(torch.tensor([[5, 6, 7]])).logits).all()


def test_dynamic_skipping_is_calibrated_measured_and_written(setup, capsys):
    out = setup / "skip-out"
    code, _, err = _run(["compress", str(setup / "model"), "--skip", "0.5", "--data", str(setup / "cal.jsonl"),
                         "--eval-data", str(setup / "held.jsonl"), "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    skip = json.loads((out / "skip.json").read_text())
    assert skip["thresholds"] == report["skip_thresholds"] and len(skip["thresholds"]) == 2
    # top-2 layers: about half of the second experts skipped on held-out text (calibrated on other text)
    assert all(1.2 < e < 1.8 for e in report["experts_per_token"].values())
    assert report["ppl_after"] != report["ppl_before"] and report["params_after"] == report["params_before"]
    # moekit eval applies skip.json (the report's ppl_after), or not with --no-skip (the model is unchanged)
    results = {}
    for extra in ([], ["--no-skip"]):
        code, text, err = _run(["eval", str(out), "--data", str(setup / "held.jsonl"), *extra], capsys)
        assert code == 0, err
        results[bool(extra)] = json.loads(text)
    assert results[False]["ppl"] == pytest.approx(report["ppl_after"], rel=1e-5)
    assert results[False]["skip"]["experts_per_token"] == pytest.approx(list(report["experts_per_token"].values()))
    assert results[True]["ppl"] == pytest.approx(report["ppl_before"], rel=1e-5) and "skip" not in results[True]
    for extra, message in ((["--skip", "1.5"], "--skip 1.5: expected a fraction"),
                           (["--skip", "0.5", "--data", str(setup / "nope.jsonl")], "nope.jsonl")):
        code, _, err = _run(["compress", str(setup / "model"), "--out", str(setup / "x"), *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["compress", str(setup / "model"), "--out", str(setup / "x"), "--skip", "0.5"], capsys)
    assert code == 2 and "--skip needs calibration data" in err


def test_merge_then_lowrank(setup, capsys):
    """M-SMoE's two steps: merging, then low-rank experts; fewer bytes than merging alone, loads back."""
    common = ["compress", str(setup / "model"), "--method", "msmoe", "--ratio", "0.5", "--data",
              str(setup / "cal.jsonl"), "--eval-data", str(setup / "held.jsonl")]
    assert _run([*common, "--out", str(setup / "merged")], capsys)[0] == 0
    code, _, err = _run([*common, "--lowrank", "0.25", "--out", str(setup / "merged-lowrank")], capsys)
    assert code == 0, err
    merged = json.loads((setup / "merged" / "report.json").read_text())
    low = json.loads((setup / "merged-lowrank" / "report.json").read_text())
    assert low["bytes_after"] < merged["bytes_after"] and low["layout"] == "moekit-manifest"
    assert low["lowrank_ranks"] == {"0": 5, "1": 5}  # round(0.25 * min(H=40, I=20))
    assert low["experts_per_layer"] == merged["experts_per_layer"]
    assert mh.load(setup / "merged-lowrank") is not None
    code, _, err = _run([*common, "--lowrank", "0.25", "--quant", "int8", "--out", str(setup / "x")], capsys)
    assert code == 2 and "--lowrank: cannot follow --quant" in err


def test_protect_super_reports_the_candidates_and_plans_around_the_confirmed(setup, capsys):
    model = tiny_model("qwen3_moe", vocab_size=4096)
    with torch.no_grad():
        mh.view(model)[0].experts.down_proj[4] *= 100.0  # a planted outlier: always a candidate
    mh.save(model, setup / "planted")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, setup / "planted" / name)
    out = setup / "protect-out"
    code, _, err = _run(["compress", str(setup / "planted"), "--method", "frequency", "--ratio", "0.5", "--data",
                         str(setup / "cal.jsonl"), "--protect-super", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (0, 4) in {(r["layer"], r["expert"]) for r in report["super_experts"]}
    confirmed: dict[str, list[int]] = {}
    for r in report["super_experts"]:
        assert r["protected"] == (r["ablation_loss_delta"] > r["ordinary_loss_delta"])
        if r["protected"]:
            confirmed.setdefault(str(r["layer"]), []).append(r["expert"])
    plan = Plan.load(out / "plan.json")
    assert plan.options["protected"] == confirmed
    for layer, experts in confirmed.items():
        assert set(experts) <= set(plan.layers[int(layer)]["keep"])


def test_prune_then_mixed_precision_calibrates_the_pruned_model(setup, capsys):
    out = setup / "mixed-out"
    code, _, err = _run(["compress", str(setup / "model"), "--method", "frequency", "--ratio", "0.5", "--quant",
                         "mixed:8000", "--data", str(setup / "cal.jsonl"), "--out", str(out)], capsys)
    assert code == 0, err
    quant = json.loads((out / "quant_plan.json").read_text())
    assert quant["expert_bytes"] <= 8000
    assert [len(entry["formats"]) for entry in quant["layers"]] == [3, 3]  # one format per kept expert


@pytest.mark.parametrize("flag", ["--cal-tokens", "--eval-tokens"])
def test_token_caps_below_one_are_refused_by_name(setup, capsys, flag):
    """--cal-tokens 0 used to end in 'no window of two or more tokens; expected more text' (the text was fine);
    --eval-tokens 0 in a perplexity of one token per domain."""
    code, _, err = _run(["compress", str(setup / "model"), "--method", "frequency", "--ratio", "0.5", "--data",
                         str(setup / "cal.jsonl"), "--eval-data", str(setup / "held.jsonl"), flag, "0", "--out",
                         str(setup / "out-caps")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{flag} 0: expected a positive number" in err
    assert not (setup / "out-caps").exists()
