"""LoRA-MoE: a pool of LoRA experts on linear layers, mixed per token by a router.

`LoraMoELinear` wraps one base `nn.Linear` (kept frozen, never copied): y = W x + sum_e w_e(x) * s_e * B_e A_e x,
with the weights w from a routing rule of `moekit.compose.rules` applied to a small linear router on x. The
variants (MoRA's rank-1 experts, Hydra's parallel + sequential branches) are in `moekit.compose.mixers`.

`LoraMoE` is the handle: `LoraMoE.from_adapters(model, [adapter dirs], router="topk")` builds a pool from saved
PEFT LoRA adapters and attaches it to `model` in place (an explicit call; `detach()` puts the original linears
back). After a forward pass, `aux_loss()` sums the auxiliary losses the rules returned (nothing is collected in
module-global state and nothing in transformers is patched).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moekit.compose.adapters import LoraWeights, check_out_dir, check_pool, read_weights
from moekit.compose.rules import RuleConfig, route
from moekit.errors import ConfigError
from moekit.files import atomic_write, swap_in, temp_dir

KINDS = ("moe", "mora", "hydra")


class LoraPool(nn.Module):
    """E LoRA experts of one rank for one linear layer: A [E, r, in], B [E, out, r], scaling [E]."""

    def __init__(self, a: Tensor, b: Tensor, scaling: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.register_buffer("scaling", scaling.clone().float())

    @classmethod
    def from_weights(cls, adapters: Sequence[LoraWeights], module: str) -> LoraPool:
        a = torch.stack([w.modules[module][0] for w in adapters])
        b = torch.stack([w.modules[module][1] for w in adapters])
        return cls(a, b, torch.tensor([w.scaling for w in adapters]))

    @classmethod
    def fresh(cls, n_experts: int, rank: int, in_features: int, out_features: int, alpha: float,
              generator: torch.Generator | None = None) -> LoraPool:
        """New experts initialised as PEFT does (A Kaiming-uniform, B zero)."""
        bound = 1.0 / in_features ** 0.5
        a = (torch.rand(n_experts, rank, in_features, generator=generator) * 2 - 1) * bound
        return cls(a, torch.zeros(n_experts, out_features, rank), torch.full((n_experts,), alpha / rank))

    @property
    def n_experts(self) -> int:
        return self.a.shape[0]

    def delta(self, x: Tensor, weights: Tensor) -> Tensor:
        """sum_e weights[:, e] * scaling_e * B_e A_e x for x [T, in], weights [T, E] -> [T, out]."""
        h = torch.einsum("ti,eri->ter", x.to(self.a.dtype), self.a)
        h = h * (weights.to(h.dtype) * self.scaling).unsqueeze(-1)
        return torch.einsum("ter,eor->to", h, self.b)


class LoraMoELinear(nn.Module):
    """A routed pool of LoRA experts over one frozen base linear layer."""

    def __init__(self, base: nn.Linear, pool: LoraPool, rule: RuleConfig, generator: torch.Generator | None = None):
        super().__init__()
        rule.check(pool.n_experts)
        self.base = base
        self.pool = pool
        self.rule = rule
        self.router = nn.Linear(base.in_features, pool.n_experts, bias=False)
        with torch.no_grad():
            self.router.weight.normal_(0.0, 0.02, generator=generator)
        self.labels: Tensor | None = None  # [T] expert index per token, for LoRA-Mixer's specialisation loss
        self.aux: dict[str, Tensor] = {}
        self.weights: Tensor | None = None  # [T, E] of the last forward, detached

    def mix(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, base output) for x [..., in]."""
        flat = x.reshape(-1, x.shape[-1])
        base_out = self.base(x)
        logits = self.router(flat.to(self.router.weight.dtype))
        labels = self.labels if self.labels is not None and self.labels.numel() == flat.shape[0] else None
        mixed = route(logits, self.rule, labels)
        self.aux, self.weights = mixed.aux, mixed.weights.detach()
        delta = self.pool.delta(flat, mixed.weights).reshape(*x.shape[:-1], -1)
        return base_out + delta.to(base_out.dtype), base_out

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x)[0]


def is_routed(module: nn.Module) -> bool:
    """A layer with a router and a rule (LoraMoELinear, ExpertsLoraMoE)."""
    return isinstance(getattr(module, "router", None), nn.Linear) and isinstance(getattr(module, "rule", None),
                                                                                  RuleConfig)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class LoraMoE:
    """The layers attached to one model; see the module docstring."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], originals: dict[str, nn.Module],
                 spec: dict) -> None:
        self.model = model
        self.layers = layers
        self._originals = originals
        self.spec = spec  # kind, rule, adapters, options: what `save` writes and `load` rebuilds from

    @classmethod
    def attach(cls, model: nn.Module, pools: dict[str, LoraPool], kind: str = "moe",
               rule: RuleConfig | None = None, seed: int = 0, experts: dict[str, tuple] | None = None,
               **options) -> LoraMoE:
        """Replace each linear `model.<name>` for name in pools by a mixture over pools[name]; in place. kind "moe"
        routes by `rule`; "mora" (options: budget) and "hydra" (options: seq_rank, seq_alpha) are the variants of
        moekit.compose.mixers. experts: {experts module path: (a, b, scaling)} of expert-parameter LoRAs
        (moekit.compose.expert_lora; every kind). The base weights are frozen; routers are trainable, the
        pools after trainable_parameters(experts=True)."""
        from moekit.compose import mixers
        from moekit.compose.expert_lora import ExpertsLoraMoE

        if kind not in KINDS:
            from moekit.errors import UnknownNameError

            raise UnknownNameError(f"mixture kind {kind!r} does not exist; expected one of {', '.join(KINDS)}")
        experts = experts or {}
        if not pools and not experts:
            raise ConfigError("adapter pool is empty; expected at least one LoRA expert per adapted module")
        rule = rule or RuleConfig()
        generator = torch.Generator().manual_seed(seed)
        named = dict(model.named_modules())
        for p in model.parameters():
            p.requires_grad_(False)
        layers: dict[str, nn.Module] = {}
        originals: dict[str, nn.Module] = {}
        for name, pool in pools.items():
            base = named.get(name)
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"module {name!r}: expected an nn.Linear of the model, found "
                                  f"{type(base).__name__}")
            pool = pool.to(base.weight.device).requires_grad_(False)  # trainable_parameters(experts=True) thaws
            if kind == "moe":
                layer = LoraMoELinear(base, pool, rule, generator)
            elif kind == "mora":
                layer = mixers.MoRALinear(base, pool, options.get("budget", pool.a.shape[1]))
            else:
                layer = mixers.HydraLinear(LoraMoELinear(base, pool, rule, generator), options.get("seq_rank", 4),
                                           options.get("seq_alpha", 8.0), generator)
            originals[name] = base
            layers[name] = layer.to(base.weight.device)
            _set_module(model, name, layer)
        for name, (a, b, scaling) in experts.items():
            base = named[name]
            device = base.gate_up_proj.device
            budget = options.get("budget", min(t.shape[2] for t in a.values())) if kind == "mora" else None
            seq = (options.get("seq_rank", 4), options.get("seq_alpha", 8.0)) if kind == "hydra" else (None, 8.0)
            layer = ExpertsLoraMoE(base, a, b, scaling, rule, generator, budget, *seq).to(device)
            originals[name] = base
            layers[name] = layer
            _set_module(model, name, layer)
        spec = {"kind": kind, "rule": asdict(rule), "options": options, "seed": seed}
        return cls(model, layers, originals, spec)

    @classmethod
    def from_adapters(cls, model: nn.Module, adapters: Sequence[str | os.PathLike], router: str = "topk",
                      kind: str = "moe", seed: int = 0, modules: Sequence[str] | None = None,
                      **options) -> LoraMoE:
        """A mixture whose experts are saved PEFT LoRA adapters (one expert per adapter, in order), attached to
        `model` in place. router is a rule name (topk, dynmole, mixer, soft, fixed); options go to RuleConfig
        (k, top_p, min_k, q, threshold, expert) or to the kind (budget; seq_rank, seq_alpha). modules, if given,
        keeps only the adapted layers with these leaf names (e.g. LoRA-Mixer's attention input/output
        projections: ["q_proj", "k_proj", "v_proj", "o_proj"]); the adapters' other layers are left out."""
        if not adapters:
            raise ConfigError("adapter pool is empty; expected at least one PEFT LoRA adapter directory")
        rule_fields = set(RuleConfig.__dataclass_fields__) - {"name"}
        rule_options = {k: v for k, v in options.items() if k in rule_fields}
        rule_options.setdefault("k", min(RuleConfig.k, len(adapters)))
        rule = RuleConfig(name=router, **rule_options)
        if kind != "mora":  # MoRA's rank-1 experts activate themselves: no router
            rule.check(len(adapters))
        weights = [read_weights(path) for path in adapters]
        from moekit.compose.expert_lora import expert_pools

        names = check_pool(model, weights)
        experts = expert_pools(model, weights)
        if modules is not None:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in [*names, *experts]})
            names = [n for n in names if n.rsplit(".", 1)[-1] in set(modules)]
            experts = {n: v for n, v in experts.items() if n.rsplit(".", 1)[-1] in set(modules)}
            if not names and not experts:
                raise ConfigError(f"modules={list(modules)}: none of the adapters' layers has one of these names; "
                                  f"expected some of {leaves}")
        pools = {name: LoraPool.from_weights(weights, name) for name in names}
        kind_options = {k: v for k, v in options.items() if k not in rule_fields}
        moe = cls.attach(model, pools, kind, rule, seed, experts=experts, **kind_options)
        moe.spec["adapters"] = [str(Path(p)) for p in adapters]
        return moe

    def detach(self) -> nn.Module:
        """Put the original linear layers back; returns the model (its base weights were never changed)."""
        for name, base in self._originals.items():
            _set_module(self.model, name, base)
        self._originals = {}
        return self.model

    def _moe_layers(self) -> list[nn.Module]:
        """The routed layers (LoraMoELinear, also inside Hydra, and ExpertsLoraMoE)."""
        return [m for layer in self.layers.values() for m in layer.modules() if is_routed(m)]

    def set_rule(self, rule: RuleConfig) -> None:
        """Route every layer by `rule` from now on (e.g. RuleConfig("fixed", expert=i) to use one expert)."""
        for layer in self._moe_layers():
            rule.check(layer.router.out_features)
            layer.rule = rule

    def force(self, expert: int) -> None:
        """Route every token of every layer to one expert (as that adapter alone)."""
        self.set_rule(replace(self.rule, name="fixed", expert=expert))

    @property
    def rule(self) -> RuleConfig:
        return RuleConfig(**self.spec["rule"])

    def set_labels(self, labels: Tensor | None) -> None:
        """Token labels [B, L] (the expert index of each token's domain; -1 for none) for the next forward, used by
        LoRA-Mixer's specialisation balance loss; None clears them."""
        for layer in self._moe_layers():
            layer.labels = None if labels is None else labels.reshape(-1)

    def aux_losses(self) -> dict[str, Tensor]:
        """The auxiliary losses of the last forward pass, each summed over layers."""
        total: dict[str, Tensor] = {}
        for layer in self.layers.values():
            for m in layer.modules():
                for name, value in getattr(m, "aux", {}).items():
                    total[name] = total[name] + value if name in total else value
        return total

    def aux_loss(self, weights: dict[str, float] | None = None) -> Tensor:
        """Weighted sum of aux_losses() (weight 1 for names not in weights); 0 when the rule has none."""
        weights = weights or {}
        losses = self.aux_losses()
        return sum((weights.get(k, 1.0) * v for k, v in losses.items()), torch.zeros(()))

    def routing(self) -> dict[str, Tensor]:
        """Per layer, the mean weight [E] each expert received in the last forward pass."""
        return {name: m.weights.mean(0) for name, layer in self.layers.items() for m in layer.modules()
                if is_routed(m) and m.weights is not None}

    def trainable_parameters(self, experts: bool = False) -> list[nn.Parameter]:
        """The trainable parameters: routers and the variants' own weights, plus the pools when experts=True."""
        params = []
        for layer in self.layers.values():
            for name, p in layer.named_parameters():
                is_base = name.startswith("base.") or ".base." in name
                if not is_base and (experts or "pool." not in f".{name}"):
                    params.append(p)
        return params

    def thaw(self, experts: bool = False) -> list[nn.Parameter]:
        """Make trainable_parameters(experts) require gradients (MoRA, having no router, always trains its experts)
        and return them: what `moekit lora mix` and a `lora_moe` recipe of `moekit train` optimise."""
        params = self.trainable_parameters(experts=experts or self.spec["kind"] == "mora")
        for p in params:
            p.requires_grad_(True)
        return params

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{name}.{k}": v for name, layer in self.layers.items() for k, v in layer.state_dict().items()
                if not (k.startswith("base.") or ".base." in k)}

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write mixture.json and mixture.safetensors (routers and experts, no base weights) atomically; a
        non-empty `out` is refused unless force."""
        final = check_out_dir(out, self.spec.get("adapters", []), force)
        with temp_dir(final, "lora-mix") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      str(tmp / "mixture.safetensors"))
            spec = {**self.spec, "modules": sorted(self.layers)}
            atomic_write(tmp / "mixture.json", json.dumps(spec, indent=2) + "\n")
            swap_in(tmp, final)
        return final

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike) -> LoraMoE:
        """Rebuild a saved mixture on `model` (the base model it was trained on), in place."""
        root = Path(path)
        try:
            spec = json.loads((root / "mixture.json").read_text())
            state = load_file(str(root / "mixture.safetensors"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"mixture {root}: expected mixture.json and mixture.safetensors ({err})") from None
        from moekit.compose.expert_lora import EXPERT_PARAMS, is_experts

        named = dict(model.named_modules())
        pools, experts = {}, {}
        for name in spec["modules"]:
            if f"{name}.scaling" in state:  # an ExpertsLoraMoE: pool.a.<param>, pool.b.<param>, scaling
                base = named.get(name)
                a = {p: state[f"{name}.pool.a.{p}"] for p in EXPERT_PARAMS if f"{name}.pool.a.{p}" in state}
                b = {p: state[f"{name}.pool.b.{p}"] for p in a if f"{name}.pool.b.{p}" in state}
                if base is None or not is_experts(base) or not a or a.keys() != b.keys() or any(
                        tuple(getattr(base, p).shape) != (a[p].shape[1], b[p].shape[2], a[p].shape[3]) for p in a):
                    raise ConfigError(f"mixture {root}: experts {name!r} do not match the base model; expected the "
                                      f"base model the mixture was trained on")
                experts[name] = (a, b, state[f"{name}.scaling"])
                continue
            prefix = next((p for p in (f"{name}.pool.", f"{name}.inner.pool.") if f"{p}a" in state), None)
            if prefix is None:
                raise ConfigError(f"mixture {root}: no experts for module {name!r} in mixture.safetensors")
            a, b, s = state[f"{prefix}a"], state[f"{prefix}b"], state[f"{prefix}scaling"]
            base = named.get(name)
            if not isinstance(base, nn.Linear) or (base.in_features, base.out_features) != (a.shape[2], b.shape[1]):
                raise ConfigError(f"mixture {root}: module {name!r} does not match the base model; expected the "
                                  f"base model the mixture was trained on")
            pools[name] = LoraPool(a, b, s)
        moe = cls.attach(model, pools, spec["kind"], RuleConfig(**spec["rule"]), spec.get("seed", 0),
                         experts=experts, **spec.get("options", {}))
        for name, layer in moe.layers.items():
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            missing, unexpected = layer.load_state_dict(own, strict=False)
            if unexpected or any(not (k.startswith("base.") or ".base." in k) for k in missing):
                raise ConfigError(f"mixture {root}: module {name!r}: weights do not fit a {spec['kind']} mixture "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        moe.spec = spec
        return moe
