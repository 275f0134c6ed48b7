"""Multi-task gates: shared bottom, MMoE, PLE-style shared/specific experts, HoME's fixes, TaskExpert's memory.

All take x [B, D] and return one output [B, O] per task, and keep what the last forward did in `self.last`:
`gates` {task: [B, E_t]} over the experts `gate_experts[task]` lists, `acts` {expert: [B, H]} its hidden
activations (what HoME's collapse diagnostic counts).

- `SharedBottom`: one MLP for every task, a tower per task (the baseline).
- `MMoE` (Ma et al., 2018): E shared experts, one softmax gate per task over all of them, towers.
- `PLE` (Tang et al., 2020, one CGC level): shared experts plus `specific` experts per task; task t's gate sees
  the shared experts and its own. With `groups` (task -> group) it is HoME's hierarchy mask: group experts sit
  between shared and task experts, and a task's gate is masked to shared + its group's + its own.
- `HoME` = PLE + HoME's fixes: `normalise` (each expert's output batch-normalised and passed through Swish, so
  experts' outputs share one scale and ReLU zeros cannot collapse an expert) and `feature_gates` (each expert reads
  x * 2 sigmoid(A_e B_e x), a low-rank private view of the input).
- `TaskExpert` (Ye and Xu, 2023): `layers` levels of shared experts; each task's gate at a level also weighs its
  feature memory (the task's previous-level feature) as one more expert, and the memory accumulates the task's
  features level by level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError


class Expert(nn.Module):
    """Linear -> act (one ReLU layer, as the MMoE paper's experts). `normalise`: BatchNorm + Swish instead of ReLU
    (HoME). `feature_gate`: rank of the input gate x * 2 sigmoid(up(down(x))) (0: none)."""

    def __init__(self, d_in: int, hidden: int, normalise: bool = False, feature_gate: int = 0):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.norm = nn.BatchNorm1d(hidden) if normalise else nn.Identity()
        self.act = nn.SiLU() if normalise else nn.ReLU()
        self.gate = (nn.Sequential(nn.Linear(d_in, feature_gate, bias=False), nn.Linear(feature_gate, d_in))
                     if feature_gate else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            x = x * 2 * torch.sigmoid(self.gate(x))
        return self.act(self.norm(self.fc(x)))


def _tower(hidden: int, out: int, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, out))


class SharedBottom(nn.Module):
    def __init__(self, d_in: int, n_tasks: int, hidden: int = 16, out: int = 1):
        super().__init__()
        self.bottom = Expert(d_in, hidden)
        self.towers = nn.ModuleList(_tower(hidden, out) for _ in range(n_tasks))
        self.gate_experts: dict[int, list[int]] = {}
        self.last: dict = {}

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.bottom(x)
        self.last = {"gates": {}, "acts": {0: h.detach()}}
        return [tower(h) for tower in self.towers]


class PLE(nn.Module):
    """Shared experts (`shared`), per-group experts (`group_experts` each, when `groups` is given) and per-task
    experts (`specific` each); task t's gate is masked to shared + its group's + its own. specific=0, no groups:
    MMoE."""

    def __init__(self, d_in: int, n_tasks: int, hidden: int = 16, out: int = 1, shared: int = 4, specific: int = 2,
                 groups: list[int] | None = None, group_experts: int = 0, normalise: bool = False,
                 feature_gates: int = 0):
        super().__init__()
        if n_tasks < 1 or shared < 0 or specific < 0 or shared + specific < 1:
            raise ConfigError(f"n_tasks={n_tasks}, shared={shared}, specific={specific}: expected n_tasks >= 1 and "
                              "at least one expert per task")
        if groups is not None and len(groups) != n_tasks:
            raise ConfigError(f"groups: expected one group per task ({n_tasks}), got {len(groups)}")
        groups = groups or list(range(n_tasks))
        owner: list[tuple[str, int]] = [("shared", -1)] * shared
        for g in sorted(set(groups)) if group_experts else []:
            owner += [("group", g)] * group_experts
        for t in range(n_tasks):
            owner += [("task", t)] * specific
        self.owner = owner
        self.experts = nn.ModuleList(Expert(d_in, hidden, normalise, feature_gates) for _ in owner)
        self.gate_experts = {t: [e for e, (kind, who) in enumerate(owner) if kind == "shared"
                                 or (kind == "group" and who == groups[t]) or (kind == "task" and who == t)]
                             for t in range(n_tasks)}
        self.gates = nn.ModuleList(nn.Linear(d_in, len(self.gate_experts[t])) for t in range(n_tasks))
        self.towers = nn.ModuleList(_tower(hidden, out) for _ in range(n_tasks))
        self.last: dict = {}

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = [e(x) for e in self.experts]  # each [B, H]
        gates, results = {}, []
        for t, (gate, tower) in enumerate(zip(self.gates, self.towers, strict=True)):
            g = torch.softmax(gate(x), dim=-1)  # [B, E_t]
            stacked = torch.stack([outs[e] for e in self.gate_experts[t]], dim=1)  # [B, E_t, H]
            results.append(tower((g.unsqueeze(-1) * stacked).sum(1)))
            gates[t] = g.detach()
        self.last = {"gates": gates, "acts": {e: o.detach() for e, o in enumerate(outs)}}
        return results


def MMoE(d_in: int, n_tasks: int, hidden: int = 16, out: int = 1, experts: int = 8) -> PLE:  # noqa: N802
    """MMoE: `experts` shared experts, one gate per task over all of them."""
    return PLE(d_in, n_tasks, hidden, out, shared=experts, specific=0)


def HoME(d_in: int, n_tasks: int, hidden: int = 16, out: int = 1, shared: int = 4, specific: int = 2,  # noqa: N802
         groups: list[int] | None = None, group_experts: int = 2, feature_gates: int = 8) -> PLE:
    """PLE with HoME's fixes: normalised experts, hierarchy masks (when `groups` is given), feature gates."""
    return PLE(d_in, n_tasks, hidden, out, shared=shared, specific=specific, groups=groups,
               group_experts=group_experts if groups is not None else 0, normalise=True, feature_gates=feature_gates)


class TaskExpert(nn.Module):
    def __init__(self, d_in: int, n_tasks: int, hidden: int = 16, out: int = 1, experts: int = 6, layers: int = 2):
        super().__init__()
        if layers < 1 or experts < 1:
            raise ConfigError(f"layers={layers}, experts={experts}: expected at least one of each")
        self.n_tasks, self.hidden = n_tasks, hidden
        self.levels = nn.ModuleList(
            nn.ModuleList(Expert(d_in if level == 0 else hidden, hidden) for _ in range(experts))
            for level in range(layers))
        self.gates = nn.ModuleList(nn.ModuleList(nn.Linear(d_in if level == 0 else hidden, experts + 1)
                                                 for _ in range(n_tasks)) for level in range(layers))
        self.towers = nn.ModuleList(_tower(hidden, out) for _ in range(n_tasks))
        self.gate_experts = {t: list(range(experts)) + [-1] for t in range(n_tasks)}  # -1: the memory
        self.last: dict = {}

    def forward(self, x: Tensor) -> list[Tensor]:
        h, memory = x, [torch.zeros(x.shape[0], self.hidden) for _ in range(self.n_tasks)]
        gates, acts = {}, {}
        for level, (experts, task_gates) in enumerate(zip(self.levels, self.gates, strict=True)):
            outs = [e(h) for e in experts]
            acts.update({(level, i): o.detach() for i, o in enumerate(outs)})
            feats = []
            for t, gate in enumerate(task_gates):
                g = torch.softmax(gate(h), dim=-1)  # [B, E + 1]
                stacked = torch.stack([*outs, memory[t]], dim=1)  # [B, E + 1, H]
                feats.append((g.unsqueeze(-1) * stacked).sum(1))
                gates[t] = g.detach()
            memory = [m + f for m, f in zip(memory, feats, strict=True)]
            h = torch.stack(feats).mean(0)  # the next level decomposes the tasks' common feature
        self.last = {"gates": gates, "acts": acts}
        return [tower(m) for tower, m in zip(self.towers, memory, strict=True)]


MODELS = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE, "home": HoME, "taskexpert": TaskExpert}


def diagnostics(model: nn.Module, zero: float = 1e-6) -> dict:
    """HoME's diagnostics from the last forward: `near_zero` {expert: share of its hidden activations with
    |a| <= zero} (collapse: > 0.9), `shared_use` {task: mean gate weight on shared experts} and `shared_share`
    {shared expert: each task's share of the gate mass it receives} (degradation: one task takes nearly all)."""
    acts = model.last["acts"]
    out: dict = {"near_zero": {str(e): float((a.abs() <= zero).float().mean()) for e, a in acts.items()}}
    owner = getattr(model, "owner", None)
    if owner is None:
        return out
    shared = [e for e, (kind, _) in enumerate(owner) if kind == "shared"]
    use, mass = {}, {e: {} for e in shared}
    for t, g in model.last["gates"].items():
        cols = [i for i, e in enumerate(model.gate_experts[t]) if e in shared]
        use[t] = float(g[:, cols].sum(-1).mean()) if cols else 0.0
        for i in cols:
            mass[model.gate_experts[t][i]][t] = float(g[:, i].sum())
    out["shared_use"] = use
    out["shared_share"] = {str(e): {t: m / max(sum(by.values()), 1e-30) for t, m in by.items()}
                           for e, by in mass.items()}
    return out
