"""One rank of the placed expert-parallel test (run by tests/serve/test_place_ep.py, env:// rendezvous): the layer
of tests/train/ep_worker.py, placed as argv[2] says (JSON device_of_expert, per-expert copies, or "none"), with the
bytes each rank sends through the layer's all-to-all exchanges measured."""

import json
import sys

import torch
import torch.distributed as dist

import moekit.train.expert_parallel as ep_module
from moekit import MoE
from moekit.train.expert_parallel import ExpertParallelMoE
from moekit.train.parallel import leave_process_group


def build(world: int, tokens: int = 12):
    torch.manual_seed(0)
    moe = MoE(16, 6, 8, k=2, num_shared_experts=1)
    x = torch.randn(world, tokens, 16) * 2
    g = torch.randn(world, tokens, 16)
    return moe, x, g


def main(out_dir: str, placement: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sent = []
    exchange = ep_module._exchange

    def measured(rows, out_splits, in_splits, group):
        # rows to other ranks (what crosses the network); the backward's exchanges run inside autograd, not here
        sent.append((sum(in_splits) - in_splits[rank]) * rows.shape[1] * rows.element_size())
        return exchange(rows, out_splits, in_splits, group)

    ep_module._exchange = measured
    moe, x_all, g_all = build(world)
    ep = ExpertParallelMoE(moe, placement=None if placement == "none" else json.loads(placement))
    x = x_all[rank].clone().requires_grad_()
    out = ep(x)
    forward_bytes = sum(sent)
    (out.hidden * g_all[rank]).sum().backward()
    torch.save({"hidden": out.hidden.detach(), "x_grad": x.grad, "sent_bytes": forward_bytes,
                "expert_ids": ep.expert_ids, "full_state": ep.full_experts_state(),
                "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()}}, f"{out_dir}/rank{rank}.pt")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
