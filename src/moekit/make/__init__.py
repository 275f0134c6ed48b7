"""Dense -> MoE (`moekit make`): split each chosen FFN of a dense decoder into experts by a neuron partition, give
the experts a router, and save the result as a native transformers MoE family.

```python
moe, plan = moekit.make.moefy(dense, experts=8, k=2, partition="kmeans", router="centroid")
```
`plan` (JSON-ready) records the partition of every layer (and its shared expert's neurons) and the settings; the model
is a plain transformers model (Qwen3-MoE, Qwen2-MoE, Mixtral or DeepSeek-V3) that `moekit.hf.save` writes and
transformers loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.make.convert import (
    TARGETS,
    convert,
    default_shared,
    expert_tensors,
    expert_width,
    ffn,
    moe_config,
    routed_scale,
    shared_scale,
    shared_tensors,
    upcycled_tensors,
)
from moekit.make.partition import PARTITIONS, partition_neurons, shared_neurons
from moekit.make.routers import DATA_ROUTERS, ROUTERS, activations, dino_router, input_rows, make_router

__all__ = ["PARTITIONS", "ROUTERS", "TARGETS", "UPCYCLE_ROUTERS", "capture_inputs", "capture_module_inputs", "check",
           "convert", "moefy", "needs_data", "token_domains", "upcycle"]


def check(config, experts: int, k: int, layers: Sequence[int] | None, copies: bool = False,
          shared: int | None = None, parts: int | None = None) -> None:
    """Every size checked against a dense config before any weight is read or any work done (`copies`: upcycled
    experts of the full width; `parts`: the FFN split into that many pieces, copied into the experts)."""
    if parts is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts or experts % k):
        raise ConfigError(f"router=dino: k={k!r}, experts={experts}; expected k in 1..E dividing E (E/k copies of "
                          "each of the FFN's k pieces)")
    layers = list(range(config.num_hidden_layers)) if layers is None else sorted(set(layers))
    moe_config(config, experts, k, layers, upcycle=copies, shared=shared, parts=parts)


def needs_data(partition: str, router: str) -> bool:
    return partition in ("coactivation", "btx") or router in (*DATA_ROUTERS, "hidden")


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: Sequence[Tensor], layers: Sequence[int],
                   max_tokens: int = 4096) -> dict[int, Tensor]:
    """Each layer's FFN inputs [N, H] (N <= max_tokens) over token windows (ids [L] each)."""
    return capture_module_inputs(model, windows, {i: ffn(model, i) for i in layers}, max_tokens)


@torch.no_grad()
def capture_module_inputs(model: nn.Module, windows: Sequence[Tensor], modules: dict[int, nn.Module],
                          max_tokens: int = 4096) -> dict[int, Tensor]:
    """The inputs [N, H] (N <= max_tokens) each of `modules` (key -> module of `model`) receives while `model` runs
    over token windows (ids [L] each)."""
    seen: dict[int, list[Tensor]] = {i: [] for i in modules}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, m in modules.items()]
    try:
        total = 0
        for ids in windows:
            model(input_ids=ids.view(1, -1))
            total += ids.numel()
            if total >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    if not total:
        raise ConfigError("data: no token windows; expected calibration text of at least 2 tokens")
    return {i: torch.cat(x)[:max_tokens] for i, x in seen.items()}


def token_domains(windows: Sequence[tuple[Tensor, str | None]], max_tokens: int = 4096) -> Tensor | None:
    """A domain id per token that `capture_inputs` keeps from these (ids, domain) windows (the same cap), or None
    when they hold fewer than two domains (then the shared expert is chosen by overall mass)."""
    names = sorted({str(d) for _, d in windows})
    if len(names) < 2:
        return None
    ids = torch.cat([torch.full((w.numel(),), names.index(str(d))) for w, d in windows])
    return ids[:max_tokens]


def moefy(model: nn.Module, experts: int, k: int, partition: str = "kmeans", router: str = "centroid",
          layers: Sequence[int] | None = None, inputs: dict[int, Tensor] | None = None, seed: int = 0,
          max_logit: float = 1e-3, shared: int | None = None, domains: Tensor | None = None
          ) -> tuple[nn.Module, dict]:
    """The MoE model and its plan. `inputs` (from `capture_inputs`) is needed by the coactivation partition and
    the learned router. `shared` shared experts of the routed width (default: one where the family has a shared
    expert) take the neurons with the most activation mass on `inputs` (the smallest over `domains`, a domain id
    per captured token), or by a weight proxy without inputs (`partition.shared_neurons`); the routed experts
    split the rest."""
    if partition not in PARTITIONS:
        raise ConfigError(f"partition={partition!r}: expected one of {', '.join(PARTITIONS)}")
    if router not in ROUTERS:
        raise ConfigError(f"router={router!r}: expected one of {', '.join(ROUTERS)}")
    shared = default_shared(model.config) if shared is None else shared
    dino = router == "dino"  # Dynamic-DINO: k pieces, E/k copies of each, a tiled router (routers.dino_router)
    groups = k if dino else experts
    check(model.config, experts, k, layers, shared=shared, parts=k if dino else None)
    layers = list(range(model.config.num_hidden_layers)) if layers is None else sorted(set(layers))
    if needs_data(partition, router) and inputs is None:
        raise ConfigError(f"partition={partition}, router={router}: needs calibration text (--data); "
                          "expected inputs from capture_inputs")
    width = expert_width(model.config, experts, shared, parts=k if dino else None)
    parts: dict[int, Tensor] = {}
    kept: dict[int, Tensor] = {}
    routers: dict[int, Tensor] = {}
    for i in layers:
        mlp = ffn(model, i)
        rows = input_rows(mlp)
        x = None if inputs is None else inputs[i].to(rows.dtype)
        acts = activations(mlp, x) if x is not None and (needs_data(partition, router) or shared) else None
        kept[i] = shared_neurons(shared * width, acts, (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                        mlp.down_proj.weight), domains)
        rest = torch.ones(rows.shape[0], dtype=torch.bool)
        rest[kept[i]] = False
        rest = torch.nonzero(rest).flatten()
        local_acts = None if acts is None else acts[:, rest]
        local = partition_neurons(partition, rows[rest], groups, seed, local_acts, layer=i)
        parts[i] = rest[local]
        if dino:
            parts[i] = parts[i].repeat_interleave(experts // k, dim=0)  # expert g * E/k + c: copy c of piece g
            routers[i] = dino_router(experts, k, rows.shape[1], seed + i)
        else:
            routers[i] = make_router(router, rows[rest], local, x, local_acts, seed,
                                     down=mlp.down_proj.weight.detach()[:, rest])
    scale = routed_scale(model.config, k)
    moe = convert(model, {i: expert_tensors(ffn(model, i), parts[i], scale) for i in layers}, routers, k,
                  None if dino else max_logit,
                  shared={i: shared_tensors(ffn(model, i), kept[i], shared_scale(model.config)) for i in layers}
                  if shared else None)
    plan = {"format": "moekit-make-plan", "version": 1, "source_type": model.config.model_type,
            "target_type": moe.config.model_type, "experts": experts, "k": k, "shared": shared,
            "partition": partition, "router": router, "seed": seed, "max_logit": None if dino else max_logit,
            "layers": {str(i): parts[i].tolist() for i in layers}}
    if shared:
        plan["shared_neurons"] = {str(i): kept[i].tolist() for i in layers}
    return moe, plan


UPCYCLE_ROUTERS = ("random", "hidden")


def upcycle(model: nn.Module, experts: int, k: int, router: str = "random", layers: Sequence[int] | None = None,
            inputs: dict[int, Tensor] | None = None, seed: int = 0, init_std: float = 0.02,
            shared: int | None = None) -> tuple[nn.Module, dict]:
    """Sparse upcycling: every expert a copy of the dense FFN, so the model equals the dense one at step 0 (the
    chosen experts' weights are renormalised to sum 1, or to routed_scaling_factor) until training makes the
    copies differ. With a shared expert (Qwen2-MoE, DeepSeek-V3: `shared`=1) it is one more copy, and the shared
    copy and the routed ones each give half the dense output. Router: `random` (normal, std `init_std`) or
    `hidden` (mergekit's hidden-state gate: k-means centres of the layer's calibration inputs, from
    `capture_inputs`, scaled to the same std)."""
    from sklearn.cluster import KMeans

    if router not in UPCYCLE_ROUTERS:
        raise ConfigError(f"router={router!r}: upcycling routers are {', '.join(UPCYCLE_ROUTERS)}")
    shared = default_shared(model.config) if shared is None else shared
    check(model.config, experts, k, layers, copies=True, shared=shared)
    layers = list(range(model.config.num_hidden_layers)) if layers is None else sorted(set(layers))
    if router == "hidden" and inputs is None:
        raise ConfigError("router=hidden: needs calibration text (--data); expected inputs from capture_inputs")
    g = torch.Generator().manual_seed(seed)
    routers = {}
    for i in layers:
        if router == "random":
            routers[i] = torch.randn(experts, model.config.hidden_size, generator=g) * init_std
        else:
            x = inputs[i].double().numpy()
            if x.shape[0] < experts:
                raise ConfigError(f"router=hidden: {x.shape[0]} calibration tokens; expected at least {experts}")
            centres = torch.from_numpy(KMeans(experts, n_init=3, random_state=seed).fit(x).cluster_centers_).float()
            routers[i] = centres / centres.std().clamp_min(1e-12) * init_std
    half = 0.5 if shared else 1.0
    copies = {i: upcycled_tensors(ffn(model, i), experts, half * routed_scale(model.config, 1)) for i in layers}
    every = torch.arange(model.config.intermediate_size)
    moe = convert(model, copies, routers, k, max_logit=None,
                  shared={i: shared_tensors(ffn(model, i), every, half * shared_scale(model.config)) for i in layers}
                  if shared else None)
    plan = {"format": "moekit-make-plan", "version": 1, "source_type": model.config.model_type,
            "target_type": moe.config.model_type, "experts": experts, "k": k, "shared": shared,
            "partition": "upcycle",
            "router": router, "seed": seed, "layers": {str(i): "copies" for i in layers}}
    return moe, plan
