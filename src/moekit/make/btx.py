"""Branch-Train-MiX (BTX): branch the dense model once per domain, train each copy on its domain, then mix: every
layer's experts are the branches' FFNs (expert d = branch d's FFN, full width), everything else (attention, norms,
embeddings, head) is the average of the branches, and a router picks among the experts (then the MoE is trained
further, e.g. `moekit make finetune`).

Router: `hidden` (each expert's row the mean FFN input of its domain's tokens in the mixed model, centred over the
domains and scaled to std `init_std`: the token's domain picks its branch) or `random`. Weights as in upcycling:
the k chosen renormalised (sum 1, or routed_scaling_factor for DeepSeek-V3, compensated in the down projections);
in a family with a shared expert (Qwen2-MoE, DeepSeek-V3) the shared expert is the average of the branches' FFNs
and the shared and routed parts each give half. With untrained branches (0 steps) the result equals the dense model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError

BTX_ROUTERS = ("hidden", "random")


@torch.no_grad()
def mix(branches: Sequence[nn.Module], k: int, router: str = "hidden",
        windows: Sequence[Sequence[Tensor]] | None = None, seed: int = 0, init_std: float = 0.02,
        max_tokens: int = 2048) -> tuple[nn.Module, dict]:
    """The BTX MoE of trained `branches` (copies of one dense model): experts = the branches' FFNs, the rest
    averaged; `windows[d]` the calibration token windows of domain d (for router=hidden)."""
    import moekit.make as mk
    from moekit.make.convert import routed_scale, shared_scale, shared_tensors, upcycled_tensors

    if len(branches) < 2:
        raise ConfigError(f"btx: {len(branches)} branch; expected at least 2 domains")
    if router not in BTX_ROUTERS:
        raise ConfigError(f"router={router!r}: BTX routers are {', '.join(BTX_ROUTERS)}")
    if router == "hidden" and (windows is None or len(windows) != len(branches)):
        raise ConfigError("router=hidden: expected the calibration windows of every domain (--data per domain)")
    first = branches[0]
    config = first.config
    shared = mk.default_shared(config)
    layers = list(range(config.num_hidden_layers))
    mk.check(config, len(branches), k, layers, copies=True, shared=shared)
    states = [b.state_dict() for b in branches]
    if any(s.keys() != states[0].keys() for s in states):
        raise ConfigError("btx: the branches' parameters differ in name; expected copies of one dense model")
    mixed = copy.deepcopy(first).eval()  # every parameter averaged; its FFNs are dropped by the conversion below
    mixed.load_state_dict({n: torch.stack([s[n].float() for s in states]).mean(0).to(t.dtype)
                           for n, t in states[0].items()})
    half = 0.5 if shared else 1.0
    experts, shared_ffn = {}, {}
    every = torch.arange(config.intermediate_size)
    for i in layers:
        copies = [upcycled_tensors(mk.ffn(b, i), 1, half * routed_scale(config, 1)) for b in branches]
        experts[i] = (torch.cat([c[0] for c in copies]), torch.cat([c[1] for c in copies]))
        if shared:  # the average of the branches' FFNs
            shared_ffn[i] = shared_tensors(mk.ffn(mixed, i), every, half * shared_scale(config))
    g = torch.Generator().manual_seed(seed)
    routers = {}
    if router == "hidden":
        centres = [mk.capture_inputs(mixed, ws, layers, max_tokens) for ws in windows]
        for i in layers:
            rows = torch.stack([c[i].mean(0) for c in centres])
            rows = rows - rows.mean(0)
            routers[i] = rows / rows.std().clamp_min(1e-12) * init_std
    else:
        routers = {i: torch.randn(len(branches), config.hidden_size, generator=g) * init_std for i in layers}
    moe = mk.convert(mixed, experts, routers, k, max_logit=None, shared=shared_ffn or None)
    plan = {"format": "moekit-make-plan", "version": 1, "source_type": config.model_type,
            "target_type": moe.config.model_type, "experts": len(branches), "k": k, "shared": shared,
            "partition": "btx", "router": router, "seed": seed, "layers": {str(i): "branches" for i in layers}}
    return moe, plan


def train_branches(model: nn.Module, domain_tokens: Sequence[Tensor], settings, progress: bool = True
                   ) -> tuple[list[nn.Module], list[int]]:
    """One copy of `model` per domain, copy d trained on `domain_tokens[d]` ([N_d] token stream) with `settings`
    (`make.finetune.Finetune`, seed + d; steps=0 leaves the copies untrained); and each copy's steps."""
    from dataclasses import replace

    from moekit.make.finetune import finetune_model

    branches, steps = [], []
    for d, tokens in enumerate(domain_tokens):
        branch = copy.deepcopy(model)
        trained = 0
        if settings.steps != 0:
            trained = len(finetune_model(branch, tokens, replace(settings, seed=settings.seed + d), progress))
        branches.append(branch.eval())
        steps.append(trained)
    return branches, steps


def btx(model: nn.Module, domain_tokens: Sequence[Tensor], k: int, settings, router: str = "hidden",
        windows: Sequence[Sequence[Tensor]] | None = None, seed: int = 0, progress: bool = True
        ) -> tuple[nn.Module, dict]:
    """Branch `model` once per domain, train branch d on `domain_tokens[d]` (`train_branches`), and `mix` them."""
    branches, steps = train_branches(model, domain_tokens, settings, progress)
    moe, plan = mix(branches, k, router, windows, seed)
    plan["branch_steps"] = steps
    return moe, plan
