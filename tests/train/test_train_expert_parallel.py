"""Expert parallelism on 2 local processes (gloo, 127.0.0.1) against the single-process layer."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ep_worker import build

from moekit import MoE

WORKER = Path(__file__).with_name("ep_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, impl: str, world: int = 2) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), impl], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("impl", ["loop", "threads"])
def test_expert_parallel_equals_single_process(tmp_path, impl):
    ranks = run_ranks(tmp_path, impl)
    moe, x_all, g_all = build(impl, 2)
    x = x_all.clone().requires_grad_()
    out = moe(x)
    (out.hidden * g_all).sum().backward()
    local = moe.num_experts // 2
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["hidden"], out.hidden[r].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["x_grad"], x.grad[r], atol=1e-5, rtol=1e-5)
        first = res["first_expert"]
        assert first == r * local
        for name, grad in res["expert_grads"].items():
            full = getattr(moe.experts, name).grad
            torch.testing.assert_close(grad, full[first:first + local], atol=1e-5, rtol=1e-5, msg=name)
    # replicated (data-parallel) parameters: the ranks' gradients sum to the single-process gradient
    torch.testing.assert_close(ranks[0]["router_grad"] + ranks[1]["router_grad"], moe.router.weight.grad,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["shared_grad"] + ranks[1]["shared_grad"],
                               moe.shared_experts.up_proj.weight.grad, atol=1e-5, rtol=1e-5)
    # every assignment was processed by exactly one rank
    assert int(ranks[0]["local_counts"].sum() + ranks[1]["local_counts"].sum()) == 2 * 10 * 2


def test_checkpoints_move_between_rank_counts(tmp_path):
    """Experts gathered from 2 ranks load into a 1-rank layer that then computes the same function; the 2-rank
    layers were themselves cut from a 1-rank layer (ExpertParallelMoE(moe))."""
    ranks = run_ranks(tmp_path, "loop")
    moe, x_all, _ = build("loop", 2)
    state = ranks[0]["full_state"]
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, getattr(moe.experts, name).detach(), rtol=0, atol=0)
    torch.manual_seed(1)
    fresh = MoE(16, 8, 6, k=2, num_shared_experts=1)
    fresh.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}, strict=False)
    fresh.experts.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x_all).hidden, moe(x_all).hidden, rtol=0, atol=0)


def test_requires_initialised_process_group():
    from moekit.errors import ConfigError
    from moekit.train.expert_parallel import ExpertParallelMoE

    with pytest.raises(ConfigError, match="not initialised"):
        ExpertParallelMoE(MoE(8, 4, 4))


def test_refuses_routers_with_their_own_expert_structure(monkeypatch):
    import torch.distributed as dist

    from moekit.errors import ConfigError
    from moekit.train.expert_parallel import ExpertParallelMoE

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *_: 0)
    with pytest.raises(ConfigError, match="'chain' builds its own expert structure"):
        ExpertParallelMoE(MoE(8, 8, 4, 2, router="chain"))
    assert ExpertParallelMoE(MoE(8, 8, 4, 2, router="top_p")).local_experts == 2
