"""LoRA-MoE on the fused 3D expert parameters of transformers v5 MoE blocks.

PEFT's `target_parameters` puts one LoRA on a parameter `W [n, out, in]` of n experts: lora_A [n*r, in] (expert j's
A is rows j*r .. j*r+r-1) and lora_B [out, r*n] (expert j's B is columns r_i*n + j), so that expert j's update is
scaling * B_j A_j. A pool of such adapters cannot be mixed by re-weighting parameters (weights are shared by every
token), so `ExpertsLoraMoE` replaces the experts module by the same computation written out per expert (as
transformers' eager path does): for each token routed to expert j,
    gate, up = (W_gu[j] + sum_e w_e s_e B_gu,e,j A_gu,e,j) x;  a = act(gate) * up;
    y = (W_d[j] + sum_e w_e s_e B_d,e,j A_d,e,j) a
with the adapter weights w from a routing rule on the block's input. The base parameters stay in the wrapped module.

MoRA on expert parameters (`budget=`): no router; for each token routed to expert j and each adapted parameter,
the pool's N*r rank-1 experts of expert j (a_{e,j,i}, b_{e,j,i}) compute h = a . x and the token keeps the `budget`
largest |h| (moekit.compose.rules.self_activated_ranks): update sum_{kept} s_e h b_{e,j,i}. With one adapter and
budget = r this is that adapter.

Hydra on expert parameters (`seq_rank=`): beside the routed parallel experts, a sequential LoRA per expert j and
parameter on that expert's base output: W_j x + parallel_j(x) + s_seq B_{s,j} A_{s,j} (W_j x), B_s zero at the
start (so the start is the parallel branch alone).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compose.adapters import LoraWeights
from moekit.compose.rules import RuleConfig, route, self_activated_ranks
from moekit.errors import ConfigError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def is_experts(module: nn.Module) -> bool:
    """A transformers v5 experts module this file can run (fused gate_up_proj, down_proj and act_fn)."""
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in EXPERT_PARAMS) and hasattr(module, "act_fn")


def resolve_param(module: nn.Module, a: Tensor, b: Tensor, rank: int) -> str | None:
    """The parameter of `module` an expert LoRA (a [n*r, in], b [out, n*r]) adapts, matched by shape."""
    found = [p for p in EXPERT_PARAMS
             if getattr(module, p).shape[0] * rank == a.shape[0] == b.shape[1]
             and tuple(getattr(module, p).shape[1:]) == (b.shape[0], a.shape[1])]
    return found[0] if len(found) == 1 else None


def split_expert_lora(a: Tensor, b: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's stacked expert LoRA as per-expert factors: (A [n, r, in], B [n, out, r])."""
    a_e = a.reshape(n_experts, -1, a.shape[-1])
    b_e = b.reshape(b.shape[0], -1, n_experts).permute(2, 0, 1)
    return a_e, b_e


class ExpertsLoraMoE(nn.Module):
    """A routed pool of expert-parameter LoRAs around one experts module (same forward signature)."""

    def __init__(self, base: nn.Module, a: dict[str, Tensor], b: dict[str, Tensor], scaling: Tensor,
                 rule: RuleConfig, generator: torch.Generator | None = None, budget: int | None = None,
                 seq_rank: int | None = None, seq_alpha: float = 8.0) -> None:
        super().__init__()
        n_adapters = int(scaling.shape[0])
        rule.check(n_adapters)
        ranks = min(n_adapters * t.shape[2] for t in a.values())
        if budget is not None and not 1 <= budget <= ranks:
            raise ConfigError(f"mora budget={budget}; expected 1 <= budget <= {ranks} (adapters x rank)")
        self.base, self.rule, self.budget = base, rule, budget
        # a[p]: [N adapters, n experts, r, in]; b[p]: [N, n, out, r]
        self.pool = nn.ModuleDict({  # frozen until LoraMoE.trainable_parameters(experts=True) thaws them
            "a": nn.ParameterDict({p: nn.Parameter(t.clone(), requires_grad=False) for p, t in a.items()}),
            "b": nn.ParameterDict({p: nn.Parameter(t.clone(), requires_grad=False) for p, t in b.items()})})
        self.register_buffer("scaling", scaling.clone().float())
        hidden = base.gate_up_proj.shape[2]
        self.router = nn.Linear(hidden, n_adapters, bias=False)
        with torch.no_grad():
            self.router.weight.normal_(0.0, 0.02, generator=generator)
        self.router.requires_grad_(budget is None)  # MoRA uses no router
        self.seq_a, self.seq_b, self.seq_scaling = nn.ParameterDict(), nn.ParameterDict(), 0.0
        if seq_rank is not None:  # Hydra's sequential branch, per expert and adapted parameter
            for name in a:
                n, out = getattr(base, name).shape[:2]
                if not 1 <= seq_rank <= out:
                    raise ConfigError(f"hydra seq_rank={seq_rank}; expected 1 <= seq_rank <= {out} ({name}'s "
                                      f"output)")
                bound = 1.0 / out ** 0.5
                self.seq_a[name] = nn.Parameter((torch.rand(n, seq_rank, out, generator=generator) * 2 - 1) * bound)
                self.seq_b[name] = nn.Parameter(torch.zeros(n, out, seq_rank))
            self.seq_scaling = seq_alpha / seq_rank
        self.labels: Tensor | None = None
        self.aux: dict[str, Tensor] = {}
        self.weights: Tensor | None = None

    def _delta(self, name: str, x: Tensor, expert: int, mix: Tensor) -> Tensor | None:
        a, b = self.pool["a"], self.pool["b"]
        if name not in a:
            return None
        h = torch.einsum("ti,nri->tnr", x.to(a[name].dtype), a[name][:, expert])
        if self.budget is not None:  # MoRA: each token keeps its budget largest rank-1 activations
            gates = self_activated_ranks(h.reshape(h.shape[0], -1), self.budget).reshape(h.shape)
            h = h * gates * self.scaling[None, :, None].to(h.dtype)
        else:
            h = h * (mix * self.scaling).unsqueeze(-1)
        return torch.einsum("tnr,nor->to", h, b[name][:, expert])

    def _seq(self, name: str, base_out: Tensor, expert: int) -> Tensor | None:
        if name not in self.seq_a:
            return None
        a, b = self.seq_a[name][expert], self.seq_b[name][expert]
        return self.seq_scaling * ((base_out.to(a.dtype) @ a.T) @ b.T)

    @staticmethod
    def _add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
        return y if x is None else x if y is None else x + y

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        base = self.base
        n_experts = base.gate_up_proj.shape[0]
        labels = self.labels if self.labels is not None and self.labels.numel() == hidden_states.shape[0] else None
        if self.budget is None:
            mixed = route(self.router(hidden_states.to(self.router.weight.dtype)), self.rule, labels)
            self.aux, self.weights, weights = mixed.aux, mixed.weights.detach(), mixed.weights
        else:  # MoRA: no router
            self.aux, self.weights = {}, None
            weights = hidden_states.new_zeros(hidden_states.shape[0], int(self.scaling.shape[0]))
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= n_experts:  # some families mark a dropped slot with index n
                continue
            token, slot = torch.where(top_k_index == expert)
            x, mix = hidden_states[token], weights[token]
            gate_up = nn.functional.linear(x, base.gate_up_proj[expert])
            delta = self._add(self._delta("gate_up_proj", x, expert, mix), self._seq("gate_up_proj", gate_up, expert))
            gate, up = (gate_up if delta is None else gate_up + delta.to(gate_up.dtype)).chunk(2, dim=-1)
            act = base.act_fn(gate) * up
            y = nn.functional.linear(act, base.down_proj[expert])
            delta = self._add(self._delta("down_proj", act, expert, mix), self._seq("down_proj", y, expert))
            y = y if delta is None else y + delta.to(y.dtype)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def experts_path(named: dict[str, nn.Module], key: str) -> str | None:
    """The experts module an adapter key adapts (PEFT nests one ParamWrapper per target parameter, hence the
    `.base_layer` suffixes), or None when the key is not an expert-parameter LoRA."""
    path = key
    while path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    module = named.get(path)
    return path if module is not None and is_experts(module) else None


def expert_pools(model: nn.Module, adapters: list[LoraWeights]) -> dict[str, tuple[dict, dict, Tensor]]:
    """{experts module path: (a, b, scaling)} from the pool's expert-parameter LoRAs; empty when there are none."""
    named = dict(model.named_modules())
    found: dict[str, dict[str, list[tuple[Tensor, Tensor]]]] = {}
    for adapter in adapters:
        for key, (a, b) in adapter.modules.items():
            path = experts_path(named, key)
            if path is None:
                continue
            module = named[path]
            param = resolve_param(module, a, b, adapter.rank)
            if param is None:
                raise ConfigError(f"adapter {adapter.path}: {key}: lora_A {tuple(a.shape)} / lora_B "
                                  f"{tuple(b.shape)} fit no expert parameter of {path}; expected an adapter "
                                  f"trained on this base model")
            found.setdefault(path, {}).setdefault(param, []).append(
                split_expert_lora(a, b, getattr(module, param).shape[0]))
    pools = {}
    scaling = torch.tensor([w.scaling for w in adapters])
    for path, params in found.items():
        for param, pairs in params.items():
            if len(pairs) != len(adapters):
                raise ConfigError(f"{path}.{param}: adapted by {len(pairs)} of {len(adapters)} adapters; expected "
                                  f"the same target parameters in every adapter of a pool")
        a = {p: torch.stack([x[0] for x in pairs]) for p, pairs in params.items()}
        b = {p: torch.stack([x[1] for x in pairs]) for p, pairs in params.items()}
        pools[path] = (a, b, scaling)
    return pools
