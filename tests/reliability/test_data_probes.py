"""Issue 14's data probes (defect 10): data and recipe files are read with a size bound; a device, a FIFO or a file
beyond the bound is one error line naming it, and is never opened (a FIFO no longer hangs, /dev/zero no longer
exhausts memory)."""

from __future__ import annotations

import os
import threading

import pytest
from reliability_util import assert_refused, run_cli

from moekit.data import read_documents
from moekit.errors import MoekitError


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    # Were the FIFO opened for reading, this writer would unblock it (after 20 s) rather than hang the suite.
    timer = threading.Timer(20.0, lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                            if path.exists() else None)
    timer.daemon = True
    timer.start()
    yield path
    timer.cancel()


@pytest.mark.parametrize("verb", ["eval", "inspect", "compress"])
def test_dev_zero_is_refused(verb, tmp_path, capsys):
    argv = {"eval": ["eval", "--data", "/dev/zero"], "inspect": ["inspect", "--data", "/dev/zero", "--out",
                                                                   tmp_path / "o"],
            "compress": ["compress", "--method", "frequency", "--ratio", "0.5", "--data", "/dev/zero", "--out",
                         tmp_path / "o"]}[verb]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, verb, "/dev/zero: is a character device")
    assert not (tmp_path / "o").exists()


def test_fifo_is_refused_without_opening_it(fifo, capsys):
    code, _, err = run_cli(["eval", "--data", fifo], capsys)
    assert_refused(code, err, "eval", "pipe.txt: is a FIFO")


def test_file_beyond_the_bound_is_refused(tmp_path, monkeypatch):
    import moekit.files

    big = tmp_path / "big.txt"
    big.write_text("word " * 400)
    monkeypatch.setattr(moekit.files, "MAX_DATA_BYTES", 1024)
    with pytest.raises(MoekitError, match=r"big.txt: 2,000 bytes; expected a text or .jsonl data file of at most "
                                          r"1,024 bytes"):
        read_documents([big])
    small = tmp_path / "small.txt"
    small.write_text("word " * 100)
    assert read_documents([small])[0].text.startswith("word")


def test_recipe_file_that_is_a_device_or_directory(tmp_path, capsys):
    for path, kind in (("/dev/zero", "character device"), (tmp_path, "directory")):
        code, _, err = run_cli(["train", "--config", path, "--out", tmp_path / "x"], capsys)
        assert_refused(code, err, "train", kind)
    assert not (tmp_path / "x").exists()
