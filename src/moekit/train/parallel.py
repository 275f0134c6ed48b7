"""The trainer's view of torch.distributed: one process (world 1) or N ranks launched by torchrun, where the
routed experts are sharded (`ExpertParallelMoE`) and every other parameter is replicated and data-parallel.

With N ranks each takes 1/N of the global batch. Averaging the replicated parameters' gradients over the ranks and
dividing the expert shards' gradients (which already sum every rank's tokens, through the all_to_all backward) by N
gives the gradient of the global-batch mean loss, so N ranks train like 1 (up to float summation order; the balance
loss is computed per rank, as data parallelism does). Checkpoints are always written in the 1-rank layout (experts
gathered), so they load on any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.train.expert_parallel import gather_shards
from moekit.train.moe_model import moe_blocks

_SHARDED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


@dataclass
class Runtime:
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place (identity on 1 rank)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


def init_runtime() -> Runtime:
    """World 1, or the torchrun world (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1 is in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Runtime(dist.get_world_size(), dist.get_rank())


def leave_process_group() -> None:
    """End a worker process whose results are already written: every rank meets at a barrier (a rank that tears its
    gloo connections down first makes a peer still exchanging abort), the group is destroyed, and the process exits
    at once, skipping interpreter teardown, where a collective's native thread still running aborts it
    ("terminate called without an active exception")."""
    import sys

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shard_experts(model: nn.Module) -> None:
    """Replace each MoEBlock's `MoE` with an `ExpertParallelMoE` holding this rank's experts."""
    from moekit.train.expert_parallel import ExpertParallelMoE

    for block in moe_blocks(model):
        block.moe = ExpertParallelMoE(block.moe)


def _sharded_names(model: nn.Module, rt: Runtime) -> dict[str, tuple[int, int]]:
    """Parameter name -> (first expert, count) for the expert shards of an expert-parallel model."""
    if rt.world == 1:
        return {}
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "local_experts"):  # ExpertParallelMoE
            for p in _SHARDED:
                if getattr(module.experts, p, None) is not None:
                    out[f"{name}.experts.{p}"] = (module.first_expert, module.local_experts)
    return out


def average_gradients(model: nn.Module, rt: Runtime) -> None:
    """Turn the ranks' gradients into the global-batch gradient (see the module docstring)."""
    if rt.world == 1:
        return
    sharded = _sharded_names(model, rt)
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if name not in sharded:
            dist.all_reduce(p.grad)
        p.grad.div_(rt.world)


def clip_gradients(model: nn.Module, max_norm: float, rt: Runtime) -> float:
    """Global gradient-norm clipping (torch's rule) over the whole, possibly sharded, model; returns the norm."""
    if rt.world == 1:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    sharded = _sharded_names(model, rt)
    local, shards = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        sq = p.grad.double().pow(2).sum()
        if name in sharded:
            shards += sq
        else:
            local += sq
    total = float((local + rt.all_reduce(shards)).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    for p in model.parameters():
        p.grad.mul_(coef)
    return total


def full_state(model: nn.Module, rt: Runtime, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` (keyed by parameter name, shaped like this rank's parameters) in the 1-rank layout: expert shards
    gathered from every rank. Collective: every rank must call it."""
    sharded = _sharded_names(model, rt)
    out = {}
    for name, t in tensors.items():
        base = _param_of(name, sharded)
        if base is None:
            out[name] = t
            continue
        out[name] = gather_shards(t, rt.world)
    return out


def local_state(model: nn.Module, rt: Runtime, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `full_state`: 1-rank-layout tensors cut down to this rank's expert shards."""
    sharded = _sharded_names(model, rt)
    out = {}
    for name, t in tensors.items():
        base = _param_of(name, sharded)
        if base is None:
            out[name] = t
        else:
            first, count = sharded[base]
            if t.shape[0] != count * rt.world:
                raise ConfigError(f"checkpoint tensor {name}: {t.shape[0]} experts; expected {count * rt.world}")
            out[name] = t[first:first + count]
    return out


def _param_of(key: str, sharded: dict[str, tuple[int, int]]) -> str | None:
    """The sharded parameter a state key belongs to (`name` or `name.<optimizer field>`), else None. Optimizer
    step counters are per parameter but equal on every rank: never sharded."""
    if key.endswith(".step"):
        return None
    for name in sharded:
        if key == name or key.startswith(name + "."):
            return name
    return None
