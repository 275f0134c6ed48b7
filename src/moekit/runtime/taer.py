"""PreMoe's task-adaptive expert retrieval (TAER): per-task expert patterns from calibration text; for a query, the
nearest stored pattern decides which experts start resident.

A task's pattern is, per MoE layer, each expert's expected selection score over the task's tokens: the mean
routing weight the expert received (0 where not chosen), PreMoe's TCESS computed from the top-k weights a trace
records. The query is matched on what is cheap to know before any expert runs: the first MoE layer's routing of
the prompt (`first_layer_routes`), compared by cosine similarity with each pattern's first layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.errors import ConfigError


@dataclass
class TaskPatterns:
    tasks: list[str]
    scores: Tensor  # [tasks, L, E]

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"format": "moekit-taer", "version": 1, "tasks": self.tasks,
                                   "scores": self.scores.tolist()}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskPatterns:
        try:
            meta = json.loads(Path(path).read_text())
            return cls(list(meta["tasks"]), torch.tensor(meta["scores"], dtype=torch.float32))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}: not a TAER pattern file ({err})") from None

    def nearest(self, first_layer: Tensor) -> int:
        """The task whose first-layer pattern is closest (cosine) to `first_layer` [E] (a query's scores)."""
        sims = torch.nn.functional.cosine_similarity(self.scores[:, 0], first_layer.unsqueeze(0), dim=-1)
        return int(sims.argmax())

    def resident_set(self, task: int, slots: int) -> list[tuple[int, int]]:
        """The `slots` highest-scoring (layer, expert) pairs of a task, best first (never-chosen experts left out)."""
        s = self.scores[task]
        order = s.flatten().argsort(descending=True)[:slots]
        E = s.shape[1]
        return [(int(i) // E, int(i) % E) for i in order if s.flatten()[i] > 0]


def selection_scores(indices: list[Tensor], weights: list[Tensor], num_experts: int) -> Tensor:
    """[L, E] mean routing weight per expert over the tokens (TCESS): per layer indices / weights [N, k]."""
    out = torch.zeros(len(indices), num_experts)
    for i, (idx, w) in enumerate(zip(indices, weights, strict=True)):
        valid = idx >= 0
        out[i].index_add_(0, idx[valid], w[valid].float())
        out[i] /= max(idx.shape[0], 1)
    return out


def patterns_from_traces(traces: dict[str, object]) -> TaskPatterns:
    """One pattern per task from its `moekit.inspect.trace` Trace."""
    if not traces:
        raise ConfigError("taer: expected at least one task's trace")
    names = list(traces)
    E = max(max(t.num_experts) for t in traces.values())
    scores = [selection_scores([t.indices(i) for i in range(len(t.layers))],
                               [t.weights(i) for i in range(len(t.layers))], E) for t in traces.values()]
    if len({s.shape for s in scores}) != 1:
        raise ConfigError("taer: the traces come from models with different MoE layers")
    return TaskPatterns(names, torch.stack(scores))


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_routes(offloaded, input_ids: Tensor) -> Tensor:
    """[E] the first MoE layer's selection scores for a prompt: the model runs up to that layer's gate only (no
    expert is read)."""
    experts = offloaded.experts[0]
    seen = {}

    def stop(_hidden, top_k_index, top_k_weights):
        seen["idx"], seen["w"] = top_k_index, top_k_weights
        raise _Stop

    module = experts.module
    module.forward = stop
    try:
        offloaded.model(input_ids)
    except _Stop:
        pass
    finally:
        module.forward = experts
    return selection_scores([seen["idx"]], [seen["w"]], experts.num_experts)[0]


def warm_start(offloaded, patterns: TaskPatterns, input_ids: Tensor) -> str:
    """Match the prompt to a task and read that task's best experts into the cache (as many as it holds).
    Returns the task's name."""
    if offloaded.store is None:
        return "resident"
    if patterns.scores.shape[1] != len(offloaded.experts):
        raise ConfigError(f"taer: patterns have {patterns.scores.shape[1]} MoE layers, the model "
                          f"{len(offloaded.experts)}")
    task = patterns.nearest(first_layer_routes(offloaded, input_ids))
    offloaded.store.warm(patterns.resident_set(task, offloaded.store.policy.capacity))
    return patterns.tasks[task]
