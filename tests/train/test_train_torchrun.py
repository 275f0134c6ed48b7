"""`torchrun --nproc-per-node 2 -m moekit.train`: expert-parallel training on 2 local gloo ranks equals 1 rank,
and checkpoints move between 2 ranks and 1 in both directions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moekit.errors import ConfigError
from moekit.train.parallel import Runtime
from moekit.train.trainer import RECIPES, _build_model, train

SETTINGS = {"moe_layer": {}, "balance_coef": 0.0}  # the balance loss is per rank under data parallelism


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "moekit.train", "--recipe", "smoke", "--out", str(out),
           *[f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.items()], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 6: loss") <= 1  # only rank 0 reports


def assert_same_model(a, b) -> None:
    ta, tb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=1e-5, rtol=1e-5, msg=name)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train("smoke", out, progress=False, **SETTINGS)
    return out


def test_two_ranks_train_like_one_and_checkpoints_move_both_ways(one_rank, tmp_path):
    """Each half of each run is compared with the uninterrupted 1-rank run: steps 1-3 on 2 ranks then 4-6 on 1,
    and steps 1-3 on 1 rank then 4-6 on 2."""
    torchrun(tmp_path / "a", "--stop-at", "3")  # 2 ranks, then 1
    assert losses(tmp_path / "a") == pytest.approx(losses(one_rank)[:3], abs=1e-5)
    train("smoke", tmp_path / "a", resume=True, progress=False, **SETTINGS)
    assert_same_model(one_rank, tmp_path / "a")
    train("smoke", tmp_path / "b", stop_at=3, progress=False, **SETTINGS)  # 1 rank, then 2
    torchrun(tmp_path / "b", "--resume")
    assert_same_model(one_rank, tmp_path / "b")
    assert losses(tmp_path / "b") == pytest.approx(losses(one_rank), abs=1e-5)


def test_expert_parallel_needs_moekit_layers():
    recipe = RECIPES["smoke"]
    with pytest.raises(ConfigError, match="moe_layer"):
        _build_model(recipe, 300, Runtime(world=2, rank=0))
