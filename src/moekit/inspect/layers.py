"""The MoE layers of a model as inspect sees them: a transformers model of a supported family (through
`moekit.hf.view`, never by attribute names) or any module containing `moekit.MoE` layers, with one hook point that
yields each forward's routing and one that yields the experts' input.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.core.experts import ExpertsLike
from moekit.core.layer import MoE, MoEOutput
from moekit.core.routing import Routing
from moekit.errors import MoekitError


class InspectError(MoekitError, ValueError):
    """A model or input inspect cannot work with (no MoE layer, token ids outside the vocabulary, ...)."""


@dataclass
class MoELayer:
    """One MoE layer. layer: its index in the model (decoder layer for transformers models; order among the
    `moekit.MoE` modules otherwise). routed: the module whose forward produces the routing (a transformers router,
    or the `moekit.MoE` itself). experts: the routed experts as moekit `Experts`. shared: the shared-expert module
    (None when there is none); shared_gate: its sigmoid gate module (transformers Qwen2-MoE), else None.
    sigmoid: routing scores are sigmoids (DeepSeek-V3), normalised to sum to 1 for probabilities."""

    layer: int
    num_experts: int
    k: int
    routed: nn.Module
    experts: ExpertsLike
    experts_module: nn.Module | None  # transformers: called as experts(hidden [T, H], indices [T, k], weights [T, k])
    shared: nn.Module | None
    shared_gate: nn.Module | None
    sigmoid: bool = False

    @property
    def is_moekit(self) -> bool:
        return isinstance(self.routed, MoE)

    def routing_from(self, output) -> Routing:
        """The Routing of one forward of `routed`, from its output, flattened over tokens and on the CPU."""
        if isinstance(output, MoEOutput):
            r = output.routing
            probs = r.probs if r.probs is not None else torch.softmax(r.logits.float(), dim=-1)
            return Routing(r.logits.detach(), r.weights.detach(), r.indices.detach(),
                           None if r.mask is None else r.mask.detach(), probs.detach())
        logits, weights, indices = output[:3]
        logits = logits.detach().reshape(-1, self.num_experts)
        if self.sigmoid:
            scores = torch.sigmoid(logits.float())
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            probs = torch.softmax(logits.float(), dim=-1)
        k = indices.shape[-1]
        return Routing(logits, weights.detach().reshape(-1, k), indices.detach().reshape(-1, k), None, probs)


def find_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in order. Raises InspectError for a model with none."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if moes:
        return [MoELayer(i, m.num_experts, m.k, m, m.experts, None, m.shared_experts, None,
                         sigmoid=False) for i, m in enumerate(moes)]
    if getattr(model, "config", None) is None:
        raise InspectError(f"{type(model).__name__}: no MoE layer; expected a transformers MoE model of a supported "
                           "family or a module containing moekit.MoE layers")
    from moekit.hf import view

    try:
        blocks = view(model)
    except MoekitError as err:
        raise InspectError(f"{type(model).__name__}: no MoE layer inspect can read ({err})") from None
    return [MoELayer(b.layer, b.num_experts, b.k, b.router, b.experts, b.experts.module, b.shared, b.shared_gate,
                     sigmoid=b.family.routing == "sigmoid_group_topk") for b in blocks]


def body(model: nn.Module) -> nn.Module:
    """What to run to see every MoE layer: a transformers model's base model (its LM head is not needed to route),
    otherwise the model itself."""
    base = getattr(model, "base_model", None) if getattr(model, "config", None) is not None else None
    return base if isinstance(base, nn.Module) else model


@contextmanager
def routing_hooks(layers: list[MoELayer], record: Callable[[int, Routing], None]):
    """While active, every forward of layer i calls record(i, routing)."""
    handles = []
    for i, layer in enumerate(layers):
        def hook(_module, _inputs, output, i=i, layer=layer):
            record(i, layer.routing_from(output))
        handles.append(layer.routed.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def expert_input_hooks(layers: list[MoELayer], record: Callable[[int, Tensor, Routing], None]):
    """While active, every forward of layer i calls record(i, hidden [T, H], routing): the tokens the routed experts
    receive and where they go."""
    handles = []
    for i, layer in enumerate(layers):
        if layer.is_moekit:
            def hook(_module, inputs, output, i=i, layer=layer):
                hidden = inputs[0].detach().reshape(-1, layer.experts.hidden_size)
                record(i, hidden, layer.routing_from(output))
            handles.append(layer.routed.register_forward_hook(hook))
        else:
            def pre_hook(_module, inputs, i=i, layer=layer):
                hidden, indices, weights = inputs[:3]
                routing = Routing(torch.empty(0), weights.detach(), indices.detach())
                record(i, hidden.detach().reshape(-1, layer.experts.hidden_size), routing)
            handles.append(layer.experts_module.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
