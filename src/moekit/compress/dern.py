"""DERN (Dropping Experts, Recombining Neurons): drop the least routed experts, cut each dropped expert into its
neuron segments (gate row, up row, down column), give each segment to the kept expert holding the most similar
neuron (cosine of the gate and up rows, the input side every expert shares), and merge the segments into that
neuron: a routing-frequency weighted average of the neuron and the segments assigned to it. Kept experts keep
their width, so the checkpoint keeps the family's layout; the dropped experts' router rows go with them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import Stats
from moekit.compress.merge import write_groups
from moekit.compress.plan import Plan
from moekit.compress.prune import _keep_top, drop_count
from moekit.compress.weights import ExpertWeights, read_experts
from moekit.hf.view import view


def _inputs(w: ExpertWeights, e: int) -> Tensor:
    """Expert e's neurons by their input side [I, 2H], unit length."""
    f = torch.cat([w.gate[e], w.up[e]], dim=1)
    return f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)


def plan_dern(model: nn.Module, stats: Stats, ratio: float, protect: dict[int, list[int]] | None = None) -> Plan:
    protected = protect or {}
    layers = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        counts = s.counts()
        keep = _keep_top(counts, drop_count(block.num_experts, ratio), set(protected.get(block.layer, [])))
        w = read_experts(block)
        kept = torch.stack([_inputs(w, e) for e in keep])  # [K, I, 2H]
        assign = {}
        for d in range(block.num_experts):
            if d in keep:
                continue
            sim = torch.einsum("jh,kih->jki", _inputs(w, d), kept)  # [I_d, K, I]
            where = sim.flatten(1).argmax(dim=1)
            assign[str(d)] = [[int(i) // w.width, int(i) % w.width] for i in where]
        layers[block.layer] = {"keep": keep, "assign": assign, "counts": counts.tolist(),
                               "router": block.router_params()["weight"].detach().float()[keep].tolist()}
        bias = block.router_params().get("bias")
        if bias is not None:
            layers[block.layer]["router_bias"] = bias.detach().float()[keep].tolist()
    return Plan("dern", ratio, layers, {"protected": protected})


def _recombine(w: ExpertWeights, entry: dict) -> list[tuple]:
    keep = entry["keep"]
    f = torch.tensor(entry["counts"]).clamp(min=1.0)  # an unseen expert still counts once
    tensors = [None if t is None else t[torch.tensor(keep)].clone() for t in w.tensors()]
    gate, up, down = tensors[0], tensors[1], tensors[2]
    total = f[torch.tensor(keep)][:, None].repeat(1, w.width)  # [K, I] weight summed into each neuron
    gate *= total[..., None]
    up *= total[..., None]
    down *= total[:, None, :]
    for d, targets in entry["assign"].items():
        d = int(d)
        for j, (k, i) in enumerate(targets):
            gate[k, i] += f[d] * w.gate[d, j]
            up[k, i] += f[d] * w.up[d, j]
            down[k, :, i] += f[d] * w.down[d, :, j]
            total[k, i] += f[d]
    gate /= total[..., None]
    up /= total[..., None]
    down /= total[:, None, :]
    return [tuple(None if t is None else t[k] for t in (gate, up, down, *tensors[3:])) for k in range(len(keep))]


def apply_dern(model: nn.Module, plan: Plan) -> None:
    for block in view(model):
        entry = plan.layers.get(block.layer)
        if entry is not None:
            write_groups(block, entry, _recombine(read_experts(block), entry))
