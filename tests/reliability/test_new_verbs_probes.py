"""Issue 14's rules for the verbs of the other wave-2 issues (generate, serve, place, make, bench offload / drift /
decode): a user mistake ends in exit code 2 with one line naming the option and what was expected, no traceback,
and nothing written."""

from __future__ import annotations

import pytest

from moekit.cli.main import main
from moekit.default import default_model_path

TINY = str(default_model_path())

PROBES = {
    "generate: zero new tokens": (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    "generate: nan temperature": (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature"),
    "generate: top-p above 1": (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "top_p"),
    "generate: unknown policy": (["generate", "--prompt", "hi", "--expert-memory", "50%", "--policy", "fifo"],
                                 "policy"),
    "generate: zero expert memory": (["generate", "--prompt", "hi", "--expert-memory", "0"], "expert"),
    "serve: port out of range": (["serve", "--port", "70000"], "port"),
    "serve: zero batch": (["serve", "--max-batch", "0"], "max-batch"),
    "place: zero devices": (["place", "--devices", "0", "--out", "OUT/p.json"], "devices"),
    "place: more devices than experts": (["place", "--devices", "4096", "--out", "OUT/p.json"], "devices"),
    "place: nan time limit": (["place", "--devices", "4", "--time-limit", "nan", "--out", "OUT/p.json"],
                              "time-limit"),
    "make: an MoE as input": (["make", TINY, "--experts", "4", "--k", "2", "--out", "OUT/m"], "already an MoE"),
    "make: k above experts": (["make", TINY, "--experts", "4", "--k", "8", "--out", "OUT/m"], ""),
    "bench offload: zero repeats": (["bench", "offload", "--repeats", "0"], "repeats"),
    "bench decode: zero repeats": (["bench", "decode", "--repeats", "0"], "repeats"),
    "bench drift: unknown stream": (["bench", "drift", "--stream", "nope", "--quick"], "nope"),
}


@pytest.mark.parametrize("case", sorted(PROBES))
def test_new_verbs_refuse_bad_input_in_one_line(case, tmp_path, capsys):
    argv, needle = PROBES[case]
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code = _exit_code(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line and "Loading weights" not in line]
    assert code == 2, (case, err)
    assert "Traceback" not in err
    assert lines and "error" in lines[-1] and needle in lines[-1], (case, err)
    assert not (tmp_path / "out").exists()


def _exit_code(argv: list[str]) -> int:
    """main's return value, or argparse's exit status (argparse exits 2 on an invalid choice or type)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
