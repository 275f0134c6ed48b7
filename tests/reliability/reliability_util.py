"""Shared by issue 14's probes: run a verb in-process, assert the one-line refusal, hash inputs, find leftovers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from moekit.cli.main import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, verb: str, *needles: str) -> None:
    """Exit 2, one line on stderr (notes from cleaning and cleared progress bars aside), the verb's error prefix, no
    traceback."""
    shown = [line.split("\r")[-1].strip() for line in err.split("\n")]  # what a terminal shows after progress bars
    lines = [line for line in shown if line and not line.startswith("moekit: note:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"moekit {verb}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree_hash(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (or of `path` itself)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def hidden_entries(directory: Path) -> list[str]:
    """Names starting with '.' in `directory`: temporaries or old versions a run left behind."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)

