"""Variants of the LoRA-MoE layer: MoRA's self-activated rank-1 experts, Hydra's parallel + sequential branches,
and MHR/Poly through PEFT's PolyConfig with an input-conditioned router in place of PEFT's task-id router.

- `MoRALinear` ("Little by Little"): a pool of E rank-r LoRAs is E*r rank-1 experts (a_i, b_i); each token computes
  every h_i = a_i . x (the intermediate activation) and keeps the `budget` ranks with the largest |h_i| (no router:
  each rank's activation is its own relevance): y = W x + sum_{i kept} s_i h_i b_i. `prune(min_share)` drops ranks
  that were almost never kept (usage is counted in training mode).
- `HydraLinear`: y = W x + (parallel) routed LoRA experts on x + (sequential) s * B_s A_s (W x): a LoRA on the
  pre-trained layer's output, initialised to zero so that the start equals the parallel branch alone.
- `poly_model` + `InputRouting`: PEFT's Poly/MHR adapters (n_skills LoRA skills, n_splits heads for MHR); PEFT
  mixes them by task id; `InputRouting.attach` swaps every Poly router for one that mixes by the mean of the
  layer's input (per sequence), and `detach` puts PEFT's back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compose.lora_moe import LoraMoELinear, LoraPool
from moekit.compose.rules import self_activated_ranks
from moekit.errors import ConfigError


class MoRALinear(nn.Module):
    """Rank-1 experts self-activated from their intermediate activations, within a per-token rank budget."""

    def __init__(self, base: nn.Linear, pool: LoraPool, budget: int) -> None:
        super().__init__()
        ranks = pool.a.shape[0] * pool.a.shape[1]
        if not 1 <= budget <= ranks:
            raise ConfigError(f"mora budget={budget}; expected 1 <= budget <= {ranks} (experts x rank)")
        self.base, self.pool, self.budget = base, pool, budget
        self.register_buffer("usage", torch.zeros(ranks))  # tokens that kept each rank-1 expert (training)
        self.register_buffer("tokens", torch.zeros(()))
        self.aux: dict[str, Tensor] = {}

    def rank_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a [R, in], b [out, R], scaling [R]) with R = experts x rank."""
        n, r = self.pool.a.shape[:2]
        a = self.pool.a.reshape(n * r, -1)
        b = self.pool.b.permute(1, 0, 2).reshape(self.pool.b.shape[1], n * r)
        return a, b, self.pool.scaling.repeat_interleave(r)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        a, b, scaling = self.rank_factors()
        h = flat.to(a.dtype) @ a.T  # [T, R]
        gates = self_activated_ranks(h, self.budget)
        if self.training:
            with torch.no_grad():
                self.usage += gates.sum(0)
                self.tokens += gates.shape[0]
        delta = ((h * gates * scaling) @ b.T).reshape(*x.shape[:-1], -1)
        return self.base(x) + delta.to(x.dtype)

    def prune(self, min_share: float) -> int:
        """Drop rank-1 experts kept by fewer than min_share of the tokens seen in training (each expert keeps at
        least one rank); returns the number of ranks dropped. Resets the usage counts."""
        if self.tokens <= 0:
            raise ConfigError("mora prune: no usage counted yet; expected a training pass before pruning")
        n, r = self.pool.a.shape[:2]
        share = (self.usage / self.tokens).reshape(n, r)
        keep = share >= min_share
        keep[torch.arange(n), share.argmax(1)] = True
        width = int(keep.sum(1).max())
        a = torch.zeros(n, width, self.pool.a.shape[2])
        b = torch.zeros(n, self.pool.b.shape[1], width)  # padded ranks are zero in both factors: they add nothing
        for e in range(n):
            idx = keep[e].nonzero().flatten()
            a[e, : len(idx)] = self.pool.a.detach()[e, idx]
            b[e, :, : len(idx)] = self.pool.b.detach()[e, :, idx]
        dropped = int((~keep).sum())
        self.pool = LoraPool(a, b, self.pool.scaling).to(self.pool.a.device)
        self.budget = min(self.budget, n * width)
        self.usage = torch.zeros(n * width, device=self.usage.device)
        self.tokens.zero_()
        return dropped


class HydraLinear(nn.Module):
    """Parallel routed LoRA experts plus a sequential LoRA on the base layer's output."""

    def __init__(self, inner: LoraMoELinear, seq_rank: int, seq_alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        out = inner.base.out_features
        if not 1 <= seq_rank <= out:
            raise ConfigError(f"hydra seq_rank={seq_rank}; expected 1 <= seq_rank <= {out} (the layer's output)")
        self.inner = inner
        bound = 1.0 / out ** 0.5
        self.seq_a = nn.Parameter((torch.rand(seq_rank, out, generator=generator) * 2 - 1) * bound)
        self.seq_b = nn.Parameter(torch.zeros(out, seq_rank))
        self.seq_scaling = seq_alpha / seq_rank

    def forward(self, x: Tensor) -> Tensor:
        y, base_out = self.inner.mix(x)
        seq = (base_out.to(self.seq_a.dtype) @ self.seq_a.T) @ self.seq_b.T
        return y + (self.seq_scaling * seq).to(y.dtype)


def poly_model(model: nn.Module, target_modules: list[str], n_tasks: int, n_skills: int = 4, n_splits: int = 1,
               r: int = 8):
    """PEFT's Poly (n_splits = 1) or MHR (n_splits > 1) adapters on `model` (wrapped in place by PEFT)."""
    from peft import PolyConfig, get_peft_model

    if n_tasks < 1 or n_skills < 1 or n_splits < 1 or r < 1:
        raise ConfigError(f"poly: n_tasks={n_tasks}, n_skills={n_skills}, n_splits={n_splits}, r={r}; expected "
                          f"positive integers")
    config = PolyConfig(target_modules=target_modules, r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                        poly_type="poly")
    return get_peft_model(model, config)


class InputRouter(nn.Module):
    """A Poly/MHR router conditioned on the input: weights [B, n_splits, n_skills] = per-head softmax of a linear
    map of the sequence's mean input (PEFT's router signature; the task id is ignored)."""

    def __init__(self, in_features: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.proj = nn.Linear(in_features, n_splits * n_skills)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, task_ids: Tensor | None, input_ids: Tensor) -> Tensor:  # noqa: ARG002 (PEFT's signature)
        pooled = input_ids.reshape(input_ids.shape[0], -1, input_ids.shape[-1]).mean(1)  # [B, in]
        logits = self.proj(pooled.to(self.proj.weight.dtype)).view(-1, self.n_splits, self.n_skills)
        return logits.softmax(-1)


class InputRouting:
    """Explicit, reversible swap of PEFT's task-id Poly routers for `InputRouter`s."""

    def __init__(self, peft_model: nn.Module) -> None:
        from peft.tuners.poly.layer import PolyLayer

        self._swapped: list[tuple[nn.ModuleDict, str, nn.Module]] = []
        self.routers: list[InputRouter] = []
        for module in peft_model.modules():
            if isinstance(module, PolyLayer):
                for adapter, old in list(module.poly_router.items()):
                    router = InputRouter(module.in_features, module.n_splits[adapter], module.n_skills[adapter])
                    router.to(module.poly_lora_A[adapter].device)
                    self._swapped.append((module.poly_router, adapter, old))
                    module.poly_router[adapter] = router
                    self.routers.append(router)
        if not self.routers:
            raise ConfigError("input routing: the model has no Poly layer; expected a model from poly_model()")

    @classmethod
    def attach(cls, peft_model: nn.Module) -> InputRouting:
        return cls(peft_model)

    def detach(self) -> None:
        for holder, adapter, old in self._swapped:
            holder[adapter] = old
        self._swapped = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for router in self.routers for p in router.parameters()]
