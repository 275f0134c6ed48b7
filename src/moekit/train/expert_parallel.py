"""Expert parallelism on torch.distributed: experts sharded across ranks, tokens exchanged with all_to_all.

Every rank holds the router and shared experts (replicated, data-parallel) and E / W routed experts (rank r owns
experts [r E/W, (r+1) E/W)). A forward pass on a rank's own tokens:
  route locally -> sort assignments by expert (so they are grouped by owner rank) -> all_to_all the rows (uneven
  splits) -> reorder the received rows by local expert -> run the local experts -> undo the reorder -> all_to_all
  the outputs back -> weight and add per token.
Both exchanges go through torch's functional `all_to_all_single_autograd`, so autograd flows through them; the
same code runs on gloo (CPU) and nccl (GPU). Router and shared-expert gradients are per rank: all-reduce them (or
wrap the model in DistributedDataParallel) as for any data-parallel parameter.

A placement (`moekit place`: device_of_expert [E], each rank holding E / W experts) replaces the contiguous blocks:
rank r owns the experts placed on it, in increasing id; router outputs are renamed to slots (rank-major) before the
dispatch, so the function computed is unchanged and only where each expert runs moves.

With EPLB replicas (`placement` given as copies: per expert the ranks holding a copy, the primary first, as
placement.json's "copies"), rank r holds a copy of every expert listed on it (slots: the most copies any rank holds;
a rank with fewer has idle padding slots). An assignment of a token to expert e runs on the copy on the token's own
rank when there is one, else on copy (t mod n_e), t being the token's index in the step (rank r's token i is
r * T + i, T the rank's token count), the simulator's rule (`moekit.serve.simulate`). Every copy holds the same
weights, so the outputs equal the unplaced layer's; each copy's gradient holds its own tokens' share only (the
expert's gradient is the sum over its copies), so training with replicas is left to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moekit.core.dispatch import combine, plan_assignments, run_experts, sorted_plan
from moekit.core.experts import Experts
from moekit.core.layer import MoE, MoEOutput, aux_losses
from moekit.core.routers import Router
from moekit.errors import ConfigError

_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


class ExpertParallelMoE(nn.Module):
    """An `MoE` whose routed experts are sharded over the ranks of `group` (default: the world), contiguously or
    as `placement` says: device_of_expert [E], or per expert the ranks holding a copy (EPLB replicas)."""

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None,
                 placement: Sequence[int] | Sequence[Sequence[int]] | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise ConfigError("ExpertParallelMoE: torch.distributed is not initialised; expected init_process_group "
                              "to have run (e.g. under torchrun)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        replicated = placement is not None and any(isinstance(d, Sequence) for d in placement)
        if moe.num_experts % self.world and not replicated:
            raise ConfigError(f"num_experts={moe.num_experts}: expected a multiple of the world size {self.world}")
        if type(moe.router).run is not Router.run or type(moe.router).make_experts is not Router.make_experts:
            raise ConfigError(f"ExpertParallelMoE: router {moe.router.name!r} builds its own expert structure; "
                              "expected a router that only chooses experts (topk, top_p, deepseek_v3, ...)")
        if moe.capacity_factor is not None:
            raise ConfigError("ExpertParallelMoE: capacity_factor must be None (expert parallelism is dropless)")
        self.num_experts = moe.num_experts
        if replicated:
            order, self.copy_slots = _replica_slots(placement, moe.num_experts, self.world)
            self.slot_of = self.copy_slots[:, 0]  # the primary copies
        else:
            order = _placement_order(placement, moe.num_experts, self.world)
            self.copy_slots = None
            self.slot_of = None if order is None else torch.argsort(order)
        # slot s (rank s // local_experts) holds expert order[s]; router outputs are renamed to slots
        self.num_slots = moe.num_experts if order is None else len(order)
        self.local_experts = self.num_slots // self.world
        self.first_expert = self.rank * self.local_experts
        self.expert_ids = (order if order is not None else torch.arange(moe.num_experts))[
            self.first_expert:self.first_expert + self.local_experts]
        self.hidden_size = moe.hidden_size
        self.dispatch_impl = moe.dispatch_impl
        self.router = moe.router
        self.shared_experts = moe.shared_experts
        self.loss_weights = moe.loss_weights
        self.experts = _slice_experts(moe.experts, self.expert_ids)

    def forward(self, hidden: Tensor, k: int | None = None, *, token_ids: Tensor | None = None) -> MoEOutput:
        x = hidden.reshape(-1, self.hidden_size)
        routing = self.router(x, k, None if token_ids is None else token_ids.reshape(-1))
        slots = self._slots(routing.indices)
        plan = plan_assignments(slots, routing.weights, self.num_slots, None, routing.mask)
        counts = torch.tensor(plan.counts, dtype=torch.int64)
        # recv_counts[s, j]: rows rank s sends for this rank's local expert j
        recv_counts = torch.empty(self.world, self.local_experts, dtype=torch.int64)
        dist.all_to_all_single(recv_counts, counts.view(self.world, self.local_experts).contiguous(), group=self.group)
        send_splits = counts.view(self.world, self.local_experts).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        xs = x.index_select(0, plan.token).to(self.experts.gate_up_proj.dtype)
        received = _exchange(xs, recv_splits, send_splits, self.group)
        order = _expert_major(recv_counts)  # source-major (as received) -> expert-major (as the experts want)
        local = received.index_select(0, order)
        if local.shape[0]:
            ys_local = run_experts(local, sorted_plan(recv_counts.sum(0).tolist()), self.experts, self.dispatch_impl)
        else:  # no token chose this rank's experts
            ys_local = local
        ys_received = torch.empty_like(ys_local).index_copy(0, order, ys_local)
        ys = _exchange(ys_received, send_splits, recv_splits, self.group)

        out = combine(ys, plan, x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        seq_len = hidden.shape[-2] if hidden.dim() >= 3 else x.shape[0]
        local_counts = recv_counts.sum(0)
        # auxiliary losses on this rank's tokens, as data parallelism computes them
        return MoEOutput(out.view(hidden.shape), routing, local_counts, 0,
                         partial(aux_losses, routing, seq_len, self.loss_weights, self.router))

    def _slots(self, idx: Tensor) -> Tensor:
        """The slot each assignment idx [T, k] runs in (module doc)."""
        if self.copy_slots is None:
            return idx if self.slot_of is None else self.slot_of.to(idx.device)[idx]
        table = self.copy_slots.to(idx.device)  # [E, max copies], -1 past an expert's copies
        n = (table >= 0).sum(1)
        mine = (table >= self.first_expert) & (table < self.first_expert + self.local_experts)
        local = torch.where(mine.any(1), (table * mine).sum(1), -1)  # [E]: the slot of the copy on this rank
        t = self.rank * idx.shape[0] + torch.arange(idx.shape[0], device=idx.device)
        rotated = table[idx, t[:, None] % n[idx]]
        return torch.where(local[idx] >= 0, local[idx], rotated)

    def full_experts_state(self) -> dict[str, Tensor]:
        """All ranks' experts gathered, by parameter name ([E, ...] each), on every rank: what a 1-rank `MoE`
        loads (`moe.experts.load_state_dict`), so N-rank checkpoints load on 1 rank."""
        state = {name: gather_shards(getattr(self.experts, name).detach(), self.world, self.group)
                 for name in _EXPERT_PARAMS if getattr(self.experts, name) is not None}
        if self.slot_of is not None:  # slot order -> expert order
            state = {name: t.index_select(0, self.slot_of) for name, t in state.items()}
        return state


def gather_shards(local: Tensor, world: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's expert shard [E_local, ...] concatenated in rank order: [world * E_local, ...], on every rank
    (collective)."""
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def _exchange(rows: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """all_to_all of rows with uneven splits, differentiable (the backward is the reverse exchange)."""
    out = all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group or dist.group.WORLD)
    return out.wait() if hasattr(out, "wait") else out


def _placement_order(placement: Sequence[int] | None, num_experts: int, world: int) -> Tensor | None:
    """Expert ids in slot order (rank-major, increasing id within a rank) for device_of_expert `placement`."""
    if placement is None:
        return None
    dev = torch.as_tensor(list(placement), dtype=torch.int64)
    if dev.shape != (num_experts,) or (num_experts and (int(dev.min()) < 0 or int(dev.max()) >= world)):
        raise ConfigError(f"placement: expected {num_experts} device ids in [0, {world}), got {list(placement)}")
    per_rank = torch.bincount(dev, minlength=world)
    if bool((per_rank != num_experts // world).any()):
        raise ConfigError(f"placement: ranks hold {per_rank.tolist()} experts; expected {num_experts // world} each")
    return torch.argsort(dev * num_experts + torch.arange(num_experts))


def _replica_slots(copies: Sequence[Sequence[int]], num_experts: int, world: int) -> tuple[Tensor, Tensor]:
    """(expert id of each slot [W * S], rank-major and by increasing id within a rank, padding slots repeating the
    rank's first expert (or expert 0); the slot of each copy [E, max copies] in `copies` order, -1 past the end)."""
    if len(copies) != num_experts or not all(
            isinstance(c, Sequence) and c and len(set(c)) == len(c) and all(0 <= int(d) < world for d in c)
            for c in copies):
        raise ConfigError(f"placement: expected per expert ({num_experts}) a non-empty list of distinct ranks in "
                          f"[0, {world}), got {[list(c) if isinstance(c, Sequence) else c for c in copies]}")
    held = [sorted(e for e in range(num_experts) if r in [int(d) for d in copies[e]]) for r in range(world)]
    per_rank = max(len(h) for h in held)
    order, slot = [], {}
    for r, h in enumerate(held):
        for i, e in enumerate(h):
            slot[(e, r)] = r * per_rank + i
        order += h + [h[0] if h else 0] * (per_rank - len(h))
    table = torch.full((num_experts, max(len(c) for c in copies)), -1, dtype=torch.int64)
    for e, c in enumerate(copies):
        table[e, :len(c)] = torch.tensor([slot[(e, int(d))] for d in c])
    return torch.tensor(order, dtype=torch.int64), table


def _slice_experts(experts: Experts, ids: Tensor) -> Experts:
    """A new `Experts` holding copies of experts `ids` (this rank's shard)."""
    local = Experts(len(ids), experts.hidden_size, experts.intermediate_size, experts.act,
                    bias=experts.gate_up_proj_bias is not None, transposed=experts.transposed,
                    dtype=experts.gate_up_proj.dtype, device=experts.gate_up_proj.device)
    with torch.no_grad():
        for name in _EXPERT_PARAMS:
            src = getattr(experts, name)
            if src is not None:
                getattr(local, name).copy_(src[ids])
    return local


def _expert_major(recv_counts: Tensor) -> Tensor:
    """Row permutation from the received order (by source rank, then local expert) to local-expert order (by
    expert, then source rank). recv_counts: [W, E_local]."""
    world, local = recv_counts.shape
    starts = (torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)).view(world, local)
    blocks = [torch.arange(int(starts[s, j]), int(starts[s, j] + recv_counts[s, j]))
              for j in range(local) for s in range(world)]
    return torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.int64)
