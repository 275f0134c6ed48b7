"""Issue 14's training probes (defects 4, 5, 6, 9, 14): recipe values checked before anything is written; a failed
run's directory can be started again with --force (or resumed once it has a checkpoint); a corrupt checkpoint is
one error line; a stale `.checkpoint-old` no longer blocks saves; checkpoint files follow the umask. Before the fix
these ended in tracebacks, saved NaN or untrained models, or left a directory neither a rerun nor --resume took."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct

import pytest
from reliability_util import assert_refused, hidden_entries, run_cli, tree_hash

from moekit.errors import MoekitError
from moekit.train.trainer import train


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A smoke run stopped after 2 of its 6 steps (checkpoint at step 2), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("run") / "run"
    old = os.umask(0o022)
    try:
        train("smoke", out, stop_at=2, progress=False)
    finally:
        os.umask(old)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --- defect 5: recipe values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "field"), [
    ("lr=NaN", "lr=nan"), ("clip=NaN", "clip=nan"), ("steps=-1", "steps=-1"), ("steps=0", "steps=0"),
    ("lr=0", "lr=0"), ("lr=\"fast\"", "lr='fast'"), ("grad_accum=0", "grad_accum=0"),
    ("batch_size=2.5", "batch_size=2.5"), ("warmup=-1", "warmup=-1"), ("min_lr_ratio=2", "min_lr_ratio=2"),
    ("seed=true", "seed=True"), ("weight_decay=Infinity", "weight_decay=inf"), ("seq_len=1000", "seq_len=1000"),
    ("model=3", "model=3"), ("max_docs_per_domain=0", "max_docs_per_domain=0"),
])
def test_bad_recipe_values_are_one_line_and_write_nothing(setting, field, tmp_path, capsys):
    out = tmp_path / "x"
    code, stdout, err = run_cli(["train", "--recipe", "smoke", "--set", setting, "--out", out], capsys)
    assert_refused(code, err, "train", field)
    assert stdout == "" and not out.exists()


def test_recipe_file_with_bad_values_and_stop_at(tmp_path, capsys):
    cfg = tmp_path / "r.json"
    cfg.write_text(json.dumps({"base": "smoke", "clip": -1}))
    code, _, err = run_cli(["train", "--config", cfg, "--out", tmp_path / "x"], capsys)
    assert_refused(code, err, "train", "clip=-1")
    with pytest.raises(MoekitError, match="stop_at=0"):
        train("smoke", tmp_path / "y", stop_at=0, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- defect 4: a failed run can be replaced (--force) ---------------------------------------------------------------

def test_failed_run_is_replaced_with_force(tmp_path, capsys):
    out = tmp_path / "X"

    def boom(_model):
        raise RuntimeError("failure after the run directory was filled")

    with pytest.raises(RuntimeError):  # fails after tokenizer/ and before any checkpoint
        train("smoke", out, init=boom, progress=False)
    assert (out / "tokenizer").is_dir() and not (out / "checkpoint").exists()
    base = ["train", "--recipe", "smoke", "--out", out]
    code, _, err = run_cli(base, capsys)
    assert_refused(code, err, "train", "not empty", "--force")
    code, _, err = run_cli([*base, "--resume"], capsys)
    assert_refused(code, err, "train", "before its first checkpoint", "--force")
    code, stdout, err = run_cli([*base, "--force"], capsys)
    assert code == 0, err
    assert "step 6: loss" in stdout and (out / "model" / "config.json").exists()
    code, _, err = run_cli([*base, "--force", "--resume"], capsys)
    assert_refused(code, err, "train", "--resume and --force")


def test_force_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    code, _, err = run_cli(["train", "--recipe", "smoke", "--out", mine, "--force"], capsys)
    assert_refused(code, err, "train", "thesis.tex", "not a training directory")
    assert (mine / "thesis.tex").read_text() == "keep"


# --- defect 6: --resume on a corrupt run ----------------------------------------------------------------------------

def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _bad_optimizer_shape(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k.endswith("exp_avg") and len(v["shape"]) == 2)
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [cols, rows] if rows != cols else [rows * cols]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


CORRUPTIONS = {
    "truncated optimizer": ("checkpoint/optimizer.safetensors", _truncate, "optimizer.safetensors: cannot be read"),
    "truncated model": ("checkpoint/model.safetensors", _truncate, "model.safetensors: cannot be read"),
    "state not JSON": ("checkpoint/state.json", lambda p: p.write_text("{"), "state.json: not JSON"),
    "state a list": ("checkpoint/state.json", lambda p: p.write_text("[1]"), "state.json: expected an object"),
    "step a string": ("checkpoint/state.json",
                      lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "2"})),
                      "state.json: expected an object"),
    "optimizer state misshapen": ("checkpoint/optimizer.safetensors", _bad_optimizer_shape, "expected AdamW state"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_resume_on_a_corrupt_checkpoint_is_one_line(case, stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    rel, corrupt, needle = CORRUPTIONS[case]
    corrupt(run / rel)
    before = tree_hash(run)
    code, _, err = run_cli(["train", "--recipe", "smoke", "--out", run, "--resume"], capsys)
    assert_refused(code, err, "train", needle)
    assert tree_hash(run) == before


def test_bad_metrics_lines_do_not_stop_a_resume(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{half a line\n")
    records = train("smoke", run, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 5, 6] and steps == [1, 2, 3, 4, 5, 6]


# --- defect 9 in the trainer, and defect 14 ---------------------------------------------------------------------

def test_stale_checkpoint_old_then_resume(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    shutil.copytree(run / "checkpoint", run / ".checkpoint-old")  # a kill between the old swap's renames
    code, _, err = run_cli(["train", "--recipe", "smoke", "--out", run, "--resume"], capsys)
    assert code == 0, err
    assert hidden_entries(run) == [] and "removed" in err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 6


def test_checkpoint_modes_follow_the_umask(stopped_run):
    for path in (stopped_run / "checkpoint", stopped_run / "checkpoint" / "model.safetensors",
                 stopped_run / "tokenizer" / "tokenizer.json", stopped_run / "metrics.jsonl"):
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path
