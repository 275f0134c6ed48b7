"""A placement applied to ExpertParallelMoE on 2 and 4 gloo ranks: outputs and gradients equal the single-process
layer (and so the unplaced expert-parallel layer), each rank holds the experts the placement gives it, and the
bytes its all-to-all exchanges send equal the simulator's."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from place_ep_worker import build

from moekit.serve.simulate import _route, a2a_bytes

WORKER = Path(__file__).with_name("place_ep_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, world: int, placement: list[int] | None) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    arg = "none" if placement is None else json.dumps(placement)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), arg], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_placed_expert_parallel_equals_single_process(tmp_path, world):
    rng = np.random.default_rng(world)
    placement = rng.permutation(np.repeat(np.arange(world), 8 // world)).tolist()
    assert placement != sorted(placement)  # not the contiguous layout
    ranks = run_ranks(tmp_path, world, placement)
    moe, x_all, g_all = build(world)
    x = x_all.clone().requires_grad_()
    out = moe(x)
    (out.hidden * g_all).sum().backward()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["hidden"], out.hidden[r].detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res["x_grad"], x.grad[r], atol=1e-6, rtol=1e-6)
        mine = [e for e in range(8) if placement[e] == r]
        assert res["expert_ids"].tolist() == mine
        for name, grad in res["expert_grads"].items():
            torch.testing.assert_close(grad, getattr(moe.experts, name).grad[mine], atol=1e-6, rtol=1e-6)
        for name, tensor in res["full_state"].items():  # gathered back in expert order
            torch.testing.assert_close(tensor, getattr(moe.experts, name).detach(), rtol=0, atol=0)
    # the simulator's bytes: token t of rank r lives on r, its experts run where the placement puts them
    idx = out.routing.indices.numpy()  # [W * T, k], rank-major like x
    home = np.repeat(np.arange(world), x_all.shape[1])
    where = np.asarray(placement)[idx]
    sent, recv = a2a_bytes(idx, home, where, world, 16 * 4)
    for r, res in enumerate(ranks):
        assert res["sent_bytes"] == sent[r] + recv[r]  # dispatch sends `sent`, the combine returns `recv`
    assert sent.sum() > 0


@pytest.mark.slow
def test_placement_changes_only_the_bytes(tmp_path):
    """The same layer unplaced and placed on 2 ranks: equal outputs, bytes as the simulator says for each."""
    placed = [0, 1, 0, 1, 0, 1, 0, 1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = run_ranks(tmp_path / "a", 2, None), run_ranks(tmp_path / "b", 2, placed)
    moe, x_all, _ = build(2)
    idx = moe(x_all).routing.indices.numpy()
    home = np.repeat(np.arange(2), x_all.shape[1])
    for ranks, dev in ((a, [0, 0, 0, 0, 1, 1, 1, 1]), (b, placed)):
        sent, recv = a2a_bytes(idx, home, np.asarray(dev)[idx], 2, 16 * 4)
        assert [res["sent_bytes"] for res in ranks] == (sent + recv).tolist()
    for ra, rb in zip(a, b, strict=True):
        torch.testing.assert_close(ra["hidden"], rb["hidden"], atol=1e-6, rtol=1e-6)


def test_replicas_equal_single_process(tmp_path):
    """EPLB copies on 2 ranks (experts 0, 2, 3 on both; rank 0 then has an idle padding slot): outputs and input
    gradients equal the single-process layer, each expert's gradient is the sum over its copies, and the bytes
    equal the simulator's for the same copies."""
    copies = [[0, 1], [1], [0, 1], [1, 0], [0], [1], [0], [1]]
    ranks = run_ranks(tmp_path, 2, copies)
    moe, x_all, g_all = build(2)
    x = x_all.clone().requires_grad_()
    out = moe(x)
    (out.hidden * g_all).sum().backward()
    grads = {name: torch.zeros_like(getattr(moe.experts, name)) for name in ranks[0]["expert_grads"]}
    assert ranks[0]["expert_ids"].tolist() == [0, 2, 3, 4, 6, 0] and ranks[1]["expert_ids"].tolist() == [0, 1, 2, 3,
                                                                                                          5, 7]
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["hidden"], out.hidden[r].detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res["x_grad"], x.grad[r], atol=1e-6, rtol=1e-6)
        for name, grad in res["expert_grads"].items():
            grads[name].index_add_(0, res["expert_ids"], grad)
        for name, tensor in res["full_state"].items():
            torch.testing.assert_close(tensor, getattr(moe.experts, name).detach(), rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, getattr(moe.experts, name).grad, atol=1e-6, rtol=1e-6)
    idx = out.routing.indices.numpy()
    home = np.repeat(np.arange(2), x_all.shape[1])
    where = _route(idx, home, copies, 2)
    assert (where != np.asarray([c[0] for c in copies])[idx]).any()  # some tokens use a second copy
    sent, recv = a2a_bytes(idx, home, where, 2, 16 * 4)
    assert [res["sent_bytes"] for res in ranks] == (sent + recv).tolist()


def test_bad_placement_refused(monkeypatch):
    import torch.distributed as dist

    from moekit import MoE
    from moekit.errors import ConfigError
    from moekit.train.expert_parallel import ExpertParallelMoE

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *_: 1)
    with pytest.raises(ConfigError, match="ranks hold \\[3, 1\\] experts; expected 2 each"):
        ExpertParallelMoE(MoE(8, 6, 4), placement=[0, 0, 0, 1])
    with pytest.raises(ConfigError, match="expected 4 device ids"):
        ExpertParallelMoE(MoE(8, 6, 4), placement=[0, 1])
    assert ExpertParallelMoE(MoE(8, 6, 4), placement=[1, 0, 0, 1]).expert_ids.tolist() == [0, 3]
    with pytest.raises(ConfigError, match="non-empty list of distinct ranks"):
        ExpertParallelMoE(MoE(8, 6, 4), placement=[[0], [1, 1], [0], [1]])
    ep = ExpertParallelMoE(MoE(8, 6, 4), placement=[[1, 0], [0], [0], [1]])
    # rank 0 holds experts 0, 1, 2; rank 1 holds 0 and 3, and a padding slot (a copy of its first expert)
    assert ep.local_experts == 3 and ep.expert_ids.tolist() == [0, 3, 0]
