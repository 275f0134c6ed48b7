"""Issue 14's output probes (defects 7, 8, 9, 12, 14): every output path is checked before any work (not inside,
equal to or holding an input; writable; a directory where one is expected); temporaries are named so a later run
finds and removes stale ones, and says so; a directory swap leaves its target whole after a kill at any point;
modes follow the umask. Before the fix each probe wrote into the input, failed only after the work with a traceback,
or left state that made every later save fail."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from reliability_util import assert_refused, dead_pid, hidden_entries, run_cli, tree_hash

import moekit.hf as mh
from moekit.default import default_model_path
from moekit.errors import MoekitError

TINY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def model_copy(tmp_path):
    """A copy of moekit-tiny's checkpoint: the input of the probes."""
    model = tmp_path / "model"
    model.mkdir()
    for name in TINY_FILES:
        shutil.copyfile(default_model_path() / name, model / name)
    return model


# --- check_output: the one check every verb runs before its work --------------------------------------------------

def test_check_output_refuses_inputs_files_and_unwritable_places(tmp_path, monkeypatch):
    from moekit.files import check_output

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("a")
    for out, word in ((src, "is the input"), (src / "sub", "lies inside the input"), (tmp_path, "contains the input")):
        with pytest.raises(MoekitError, match=word):
            check_output(out, [src])
    with pytest.raises(MoekitError, match="exists and is not a directory"):
        check_output(src / "a.txt")
    with pytest.raises(MoekitError, match="a.txt is not a directory"):
        check_output(src / "a.txt" / "out")
    with pytest.raises(MoekitError, match="is a directory; expected a file path"):
        check_output(src, directory=False)
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked else real_access(p, mode))
    with pytest.raises(MoekitError, match="cannot write in .*locked .permission denied"):
        check_output(tmp_path / "locked" / "new" / "out")
    assert check_output(tmp_path / "fresh" / "out") == (tmp_path / "fresh" / "out").resolve()
    assert not (tmp_path / "fresh").exists()  # checking creates nothing


# --- defect 7: output inside the input -----------------------------------------------------------------------------

def test_inspect_out_inside_the_model_is_refused(model_copy, capsys):
    before = tree_hash(model_copy)
    code, _, err = run_cli(["inspect", model_copy, "--out", model_copy / "rep"], capsys)
    assert_refused(code, err, "inspect", "lies inside the input")
    assert tree_hash(model_copy) == before and not (model_copy / "rep").exists()


def test_hf_save_into_a_subdirectory_of_its_source_is_refused(model_copy):
    model = mh.load(model_copy)
    before = tree_hash(model_copy)
    with pytest.raises(MoekitError, match="is the directory the model was loaded from .*lies inside it"):
        mh.save(model, model_copy / "sub")
    assert tree_hash(model_copy) == before and hidden_entries(model_copy) == []
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]


# --- defect 8: permissions and outputs found at the start, not after the work -------------------------------------

def test_tour_out_existing_file_and_zero_repeats_refused_at_start(tmp_path, capsys):
    existing = tmp_path / "report.txt"
    existing.write_text("mine")
    code, out, err = run_cli(["tour", "--out", existing], capsys)
    assert_refused(code, err, "tour", "exists and is not a directory")
    assert out == "" and existing.read_text() == "mine"  # nothing of the tour ran
    code, out, err = run_cli(["tour", "--repeats", "0", "--out", tmp_path / "t"], capsys)
    assert_refused(code, err, "tour", "--repeats 0")
    assert out == "" and not (tmp_path / "t").exists()


@pytest.mark.parametrize("what", ["layer", "hf-accelerate", "train"])
def test_bench_zero_repeats_refused_before_any_run(what, capsys):
    code, out, err = run_cli(["bench", what, "--repeats", "0"], capsys)
    assert_refused(code, err, "bench", "--repeats=0")
    assert out == ""


@pytest.mark.parametrize("verb", ["compress", "inspect", "train", "tour"])
def test_unwritable_out_is_refused_before_any_work(verb, tmp_path, capsys, monkeypatch):
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked else real_access(p, mode))
    out = tmp_path / "locked" / "out"
    argv = {"compress": ["compress", "--method", "frequency", "--ratio", "0.5", "--data", default_model_path() /
                         "test_split.jsonl", "--out", out],
            "inspect": ["inspect", "--out", out], "train": ["train", "--recipe", "smoke", "--out", out],
            "tour": ["tour", "--out", out]}[verb]
    code, stdout, err = run_cli(argv, capsys)
    assert_refused(code, err, verb, "permission denied")
    assert stdout == "" and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli(["inspect", "--out", ro / "out"], capsys)
        assert_refused(code, err, "inspect", "permission denied")
    finally:
        ro.chmod(0o755)


# --- defect 9: swaps that survive a kill at any point -------------------------------------------------------------

def _version(directory, text):
    directory.mkdir()
    (directory / "v.txt").write_text(text)


def test_swap_kill_points_recover(tmp_path):
    from moekit.files import clean_stale

    final = tmp_path / "checkpoint"
    pid = dead_pid()
    # killed while writing the new version: the old is whole, the temporary goes
    _version(final, "old")
    _version(tmp_path / f".checkpoint.saving-{pid}-ab12", "half")
    # killed between the two renames: no final, the old version beside it, the new temporary
    _version(tmp_path / f".checkpoint.old-{pid}", "older")
    final_missing = tmp_path / "other"
    _version(tmp_path / f".other.old-{pid}", "prev")
    _version(tmp_path / f".other.saving-{pid}-cd34", "new")
    removed = clean_stale(final) + clean_stale(final_missing)
    assert (final / "v.txt").read_text() == "old"  # a whole final keeps its content; its stale old goes
    assert (final_missing / "v.txt").read_text() == "prev"  # the old version is put back
    assert hidden_entries(tmp_path) == [] and len(removed) == 4


def test_stale_checkpoint_old_no_longer_blocks_saves(tmp_path, capsys):
    """The name the trainer used before (.checkpoint-old, no pid) left by a kill made every save fail (ENOTEMPTY)."""
    from moekit.files import new_temp_dir, swap_in

    final = tmp_path / "checkpoint"
    _version(final, "1")
    _version(tmp_path / ".checkpoint-old", "0")
    new = new_temp_dir(final, "saving")
    (new / "v.txt").write_text("2")
    swap_in(new, final)
    assert (final / "v.txt").read_text() == "2" and hidden_entries(tmp_path) == []
    assert "removed" in capsys.readouterr().err


def test_atomic_write_removes_a_killed_writers_temporary(tmp_path, capsys):
    from moekit.files import atomic_write

    stale = tmp_path / f".metrics.jsonl.tmp-{dead_pid()}-9f"
    stale.write_text("half")
    atomic_write(tmp_path / "metrics.jsonl", "whole\n")
    assert hidden_entries(tmp_path) == [] and (tmp_path / "metrics.jsonl").read_text() == "whole\n"
    assert "moekit: note: removed" in capsys.readouterr().err


def test_a_live_process_temporaries_are_left_alone(tmp_path):
    from moekit.files import clean_stale

    live = tmp_path / f".out.saving-{os.getpid()}-ee"
    live.mkdir()
    clean_stale(tmp_path / "out")
    assert live.exists()


# --- defect 12: temporaries of killed runs are found, removed and reported -----------------------------------------

def test_compress_removes_stale_temporaries_and_says_so(tmp_path, capsys):
    out = tmp_path / "small"
    legacy = tmp_path / ".small.compress-k3j_x9q2"  # mkdtemp's name before the fix
    current = tmp_path / f".small.compress-{dead_pid()}-0a1b"
    for d in (legacy, current):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    bad = tmp_path / "cal.jsonl"
    bad.write_text("{not json\n")  # the run stops at its data, after the output check
    code, _, err = run_cli(["compress", "--method", "frequency", "--ratio", "0.5", "--data", bad, "--out", out],
                           capsys)
    assert_refused(code, err, "compress", "cal.jsonl:1")
    assert not legacy.exists() and not current.exists()
    assert err.count("moekit: note: removed") == 2


# --- defect 14: modes from the umask --------------------------------------------------------------------------------

def _modes(root):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_outputs_follow_the_umask(tmp_path):
    from hf.tiny import tiny_model
    from moekit.files import atomic_write

    old = os.umask(0o022)
    try:
        out = mh.save(tiny_model("mixtral"), tmp_path / "saved")
        atomic_write(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes["saved"] == 0o755 and modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o644
