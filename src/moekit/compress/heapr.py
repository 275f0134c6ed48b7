"""HEAPr: atomic-expert (neuron) pruning scored in output space.

Atomic expert k of expert e is (gate row k, up row k, down column k); its contribution to the block output for
token t is r_te h_tk w_k (r_te the routing weight, h_tk the neuron's activation, w_k = down[:, k]). With the
Fisher approximation of the loss Hessian at the block output, M = E_t[g_t g_t^T] (g_t the gradient of the
calibration loss at the block output for token t), removing it costs about

    S_k = E_t[(r_te h_tk)^2] * w_k^T M w_k

(HEAPr's score; the expectation over all calibration tokens, 0 where e is not routed). Scores are ranked
globally across layers; the lowest `ratio` of all atomic experts go, every expert keeping at least one. Experts
end with different widths, stored as `moekit.core.experts.ragged.RaggedExperts` (saved through the moekit manifest).
GPT-OSS's biases follow their neurons (gate / up bias k with atomic expert k); an expert's down bias belongs to no
neuron and stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.compress.calibrate import Stats
from moekit.compress.plan import Plan
from moekit.compress.weights import ExpertWeights, read_experts, write_block
from moekit.core.experts.ragged import make_ragged
from moekit.errors import ConfigError
from moekit.hf.view import view


@torch.no_grad()
def heapr_scores(model: nn.Module, stats: Stats) -> dict[int, torch.Tensor]:
    """{layer: S [E, I]} for every MoE block (stats must hold gradients: calibrate(..., grads=True))."""
    out = {}
    for block, s in zip(view(model), stats.layers, strict=True):
        if s.grad is None:
            raise ConfigError("heapr: the calibration statistics hold no gradients; expected calibrate(..., "
                              "grads=True)")
        m = s.grad.t() @ s.grad / len(s.grad)  # [H, H]
        routed = s.gate_weight()  # [T, E]
        w = read_experts(block)
        scores = torch.zeros(block.num_experts, w.width)
        for e in range(block.num_experts):
            tokens = routed[:, e] > 0
            if not tokens.any():
                continue
            x = s.x[tokens].to(block.experts.gate_up_proj.dtype)
            bias = block.experts.gate_up_proj_bias
            h = block.experts.act(F.linear(x, block.experts.up_weight(e), None if bias is None else bias[e]))
            h = h.float()  # [n, I]
            energy = (routed[tokens, e, None] * h).pow(2).sum(dim=0) / len(s.x)  # E_t[(r h_k)^2]
            curvature = torch.einsum("hk,hg,gk->k", w.down[e], m, w.down[e])  # w_k^T M w_k
            scores[e] = energy * curvature
        out[block.layer] = scores
    return out


def plan_heapr(model: nn.Module, stats: Stats, ratio: float, protect: dict[int, list[int]] | None = None) -> Plan:
    """Remove the `ratio` of all atomic experts (every layer, every expert) with the lowest HEAPr score. Every
    expert keeps its best neuron and the experts in `protect` ({layer: experts}) keep all of theirs; the others
    are ranked, so exactly round(ratio * all neurons) go while that many are removable."""
    scores = heapr_scores(model, stats)
    removable = {}
    for layer, s in scores.items():
        mask = torch.ones_like(s, dtype=torch.bool)
        mask[torch.arange(s.shape[0]), s.argmax(dim=1)] = False
        mask[(protect or {}).get(layer, [])] = False
        removable[layer] = mask
    flat = torch.cat([s.flatten() for s in scores.values()])
    eligible = torch.cat([m.flatten() for m in removable.values()]).nonzero().flatten()
    remove = min(round(ratio * len(flat)), len(eligible))
    keep_mask = torch.ones(len(flat), dtype=torch.bool)
    keep_mask[eligible[torch.argsort(flat[eligible], stable=True)[:remove]]] = False
    layers, start = {}, 0
    for layer, s in scores.items():
        mask = keep_mask[start: start + s.numel()].reshape(s.shape)
        start += s.numel()
        layers[layer] = {"keep": list(range(s.shape[0])),
                         "neurons": [mask[e].nonzero().flatten().tolist() for e in range(s.shape[0])]}
    return Plan("heapr", ratio, layers, {"protected": protect or {}},
                summary={"neurons_before": len(flat), "neurons_after": len(flat) - remove})


def apply_heapr(model: nn.Module, plan: Plan) -> None:
    for block in view(model):
        entry = plan.layers.get(block.layer)
        if entry is None:
            continue
        w = read_experts(block)
        neurons = [torch.tensor(n, dtype=torch.long) for n in entry["neurons"]]
        widths = [len(n) for n in neurons]
        if set(widths) == {w.width}:  # nothing removed in this layer
            continue
        # per expert: gate [w_e, H], up [w_e, H], down [H, w_e], gate / up biases [w_e] (None without biases)
        kept = [(w.gate[e, n], w.up[e, n], w.down[e][:, n], None if w.gate_bias is None else w.gate_bias[e, n],
                 None if w.up_bias is None else w.up_bias[e, n]) for e, n in enumerate(neurons)]
        if len(set(widths)) == 1:  # every expert the same width: the family's own layout
            gate, up, down, gate_bias, up_bias = (None if parts[0] is None else torch.stack(parts)
                                                  for parts in zip(*kept, strict=True))
            params = block.router_params()
            write_block(block, ExpertWeights(gate, up, down, gate_bias, up_bias, w.down_bias),
                        params["weight"].detach(), params.get("bias"), params.get("e_score_correction_bias"))
            continue
        ragged = make_ragged(block.block, widths, w.gate.shape[2], block.family.experts)
        ragged.pack(*(list(parts) for parts in zip(*kept, strict=True)), down_bias=w.down_bias)
