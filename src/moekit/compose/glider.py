"""Glider's local router (Li et al.), per layer and token, over a pool of LoRA experts, with the global router's
per-input scores as a prior: score_e(x) = local_e(x) + alpha · global_e, top-k, softmax(score / temperature) over
the chosen experts.

The local router comes in two forms:
- "gates" (Glider's, as in Phatgoose): after the experts are trained, one gate vector v_e per module and expert is
  trained on expert e's own data with everything else frozen, the module computing W x + sigmoid(v_e · x) ΔW_e x;
  at inference local_e(x) = cos(x, v_e);
- "arrow" (no training): v_e is the top right singular vector of the expert's B_e A_e and local_e(x) = |cos(x, v_e)|.
`Glider(...)` attaches in place (explicit; `detach()` restores the model); `set_global(scores)` before each input.
The global router is moekit.compose.model_routing.GliderGlobal. Trained gates are saved with `save_gates` (one
[E, in] tensor per module in a safetensors file, the experts' names in its metadata) and put back with
`Glider.load_gates`; `moekit route fit --router glider-global --gate-steps N` writes them beside the router file.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError

LOCAL = ("gates", "arrow")


class GliderLinear(nn.Module):
    """One linear layer with the local router over a pool (moekit.compose.lora_moe.LoraPool)."""

    def __init__(self, base: nn.Linear, pool, alpha: float = 1.0, k: int = 1, temperature: float = 0.1) -> None:
        super().__init__()
        self.base, self.pool, self.alpha, self.temperature = base, pool, alpha, temperature
        self.k = min(k, pool.n_experts)
        with torch.no_grad():  # Arrow's prototypes: top right singular vector of each B_e A_e
            protos = [torch.linalg.svd(pool.b[e].float() @ pool.a[e].float(), full_matrices=False)[2][0]
                      for e in range(pool.n_experts)]
        self.protos = nn.Parameter(torch.stack(protos), requires_grad=False)  # v_e: [E, in]
        self.local = "arrow"
        self.register_buffer("global_scores", torch.zeros(pool.n_experts))  # set per input by Glider.set_global
        self.gate_expert: int | None = None  # while gates train: expert e alone, scaled by sigmoid(v_e · x)
        self.last_weights: Tensor | None = None

    def local_scores(self, x: Tensor) -> Tensor:
        """[T, E] for tokens x [T, in]."""
        cos = F.normalize(x.float(), dim=-1) @ F.normalize(self.protos, dim=-1).T
        return cos.abs() if self.local == "arrow" else cos

    def weights(self, x: Tensor) -> Tensor:
        """Routing weights [T, E] (zero outside each token's top-k)."""
        if self.gate_expert is not None:
            w = torch.zeros(x.shape[0], self.pool.n_experts, dtype=torch.float32, device=x.device)
            w[:, self.gate_expert] = torch.sigmoid(x.float() @ self.protos[self.gate_expert])
            return w
        score = self.local_scores(x) + self.alpha * self.global_scores
        top = torch.topk(score, self.k, dim=-1)
        w = torch.zeros_like(score).scatter(-1, top.indices, torch.softmax(top.values / self.temperature, dim=-1))
        self.last_weights = w.detach()  # [T, E] of the last forward (routing accuracy in bench compose)
        return w

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        delta = self.pool.delta(flat, self.weights(flat)).reshape(*x.shape[:-1], -1)
        return self.base(x) + delta.to(x.dtype)


class Glider:
    """The local router attached to `model` over saved adapters (moekit.compose.adapters.LoraWeights)."""

    def __init__(self, model: nn.Module, adapters: list, alpha: float = 1.0, k: int = 1,
                 temperature: float = 0.1) -> None:
        from moekit.compose.adapters import check_pool
        from moekit.compose.lora_moe import LoraPool

        modules = check_pool(model, adapters)
        self.model, self.originals, self.layers = model, {}, {}
        for name in modules:
            base = model.get_submodule(name)
            layer = GliderLinear(base, LoraPool.from_weights(adapters, name), alpha, k, temperature)
            self.originals[name], self.layers[name] = base, layer
            _set(model, name, layer)

    @property
    def n_experts(self) -> int:
        return next(iter(self.layers.values())).pool.n_experts

    def set_global(self, scores) -> None:
        s = torch.as_tensor(np.asarray(scores), dtype=torch.float32).reshape(-1)
        if s.numel() != self.n_experts:
            raise ConfigError(f"global scores: {s.numel()} values; expected one per expert ({self.n_experts})")
        for layer in self.layers.values():
            layer.global_scores.copy_(s)

    def train_gates(self, windows: dict[int, Tensor], steps: int, lr: float = 1e-2, batch_size: int = 8,
                    seed: int = 0, progress: bool = True) -> dict[int, float]:
        """Train each expert e's gate vectors (every layer) on windows[e] [N, L] with the model and the experts
        frozen; the local router becomes "gates". Returns each expert's last training loss."""
        from moekit.compose.loop import fit

        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        protos = [layer.protos for layer in self.layers.values()]
        losses = {}
        try:
            for layer in self.layers.values():
                layer.protos.data.zero_()  # sigmoid(0) = 1/2: every gate starts half open
                layer.protos.requires_grad_(True)
                layer.local = "gates"
            for e, w in windows.items():
                for layer in self.layers.values():
                    layer.gate_expert = e
                losses[e] = fit(self.model, w, protos, steps, lr, batch_size, seed, progress=progress,
                                desc=f"glider gates {e}")["last_loss"]
        finally:
            for layer in self.layers.values():
                layer.gate_expert = None
            for n, p in self.model.named_parameters():
                p.requires_grad_(grads.get(n, False))
        return losses

    def gates(self) -> dict[str, Tensor]:
        """{module: gate vectors [E, in]} (what train_gates learned; Arrow's prototypes before training)."""
        return {name: layer.protos.detach().clone() for name, layer in self.layers.items()}

    def load_gates(self, path: str | os.PathLike, experts: list[str] | None = None) -> None:
        """Put gates saved by save_gates back; the local router becomes "gates". `experts`, if given, must be the
        names the gates were saved with, in order (one-line ConfigError for another pool or base model)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                saved = json.loads((f.metadata() or {}).get("experts", "null"))
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read Glider gates ({err}); expected the file written by "
                              "moekit route fit --gate-steps") from None
        if experts is not None and saved != list(experts):
            raise ConfigError(f"{path}: gates for experts {saved}; expected {list(experts)} (the router's experts)")
        for name, layer in self.layers.items():
            gate = state.get(name)
            if gate is None or gate.shape != layer.protos.shape:
                raise ConfigError(f"{path}: module {name!r}: gates "
                                  f"{None if gate is None else list(gate.shape)}, expected "
                                  f"{list(layer.protos.shape)}; expected gates trained on these adapters and model")
        for name, layer in self.layers.items():
            layer.protos.data.copy_(state[name])
            layer.local = "gates"

    def detach(self) -> nn.Module:
        for name, base in self.originals.items():
            _set(self.model, name, base)
        self.layers = {}
        return self.model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_gates(glider: Glider, out: str | os.PathLike, experts: list[str]) -> None:
    """Write the gates of `glider` to the safetensors file `out` (atomically), the experts' names in its metadata."""
    from safetensors.torch import save

    from moekit.files import atomic_write

    if len(experts) != glider.n_experts:
        raise ConfigError(f"{len(experts)} expert names for {glider.n_experts} experts; expected one name each")
    atomic_write(out, save({k: v.contiguous() for k, v in glider.gates().items()},
                           metadata={"format": "glider-gates", "experts": json.dumps(list(experts))}))
