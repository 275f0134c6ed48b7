"""One rank of the expert-parallel test (run by tests/train/test_train_expert_parallel.py, env:// rendezvous)."""

import sys

import torch
import torch.distributed as dist

from moekit import MoE
from moekit.train.expert_parallel import ExpertParallelMoE
from moekit.train.parallel import leave_process_group


def build(impl: str, world: int):
    """The same layer and data on every rank and in the single-process reference (seeded)."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 6, k=2, num_shared_experts=1, dispatch=impl)
    x = torch.randn(world, 10, 16) * 2
    g = torch.randn(world, 10, 16)
    return moe, x, g


def main(out_dir: str, impl: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    moe, x_all, g_all = build(impl, world)
    ep = ExpertParallelMoE(moe)
    x = x_all[rank].clone().requires_grad_()
    out = ep(x)
    (out.hidden * g_all[rank]).sum().backward()
    torch.save({
        "hidden": out.hidden.detach(),
        "x_grad": x.grad,
        "first_expert": ep.first_expert,
        "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
        "router_grad": ep.router.weight.grad,
        "shared_grad": ep.shared_experts.up_proj.weight.grad,
        "full_state": ep.full_experts_state(),
        "local_counts": out.expert_counts,
    }, f"{out_dir}/rank{rank}.pt")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
