"""Read-ME's pre-gating router: one router, decoupled from the backbone, that gives every MoE layer's expert choice
from the token ids alone, before any layer runs, so a runtime can read each layer's experts ahead of time
(`moekit.runtime.prefetch`'s `pregate` mode takes `PreGate.experts`).

Here the router sees the token's input embedding and its predecessor's (a context of one token; Read-ME uses a
small transformer over the sequence), through one hidden layer, and scores every layer's experts at once:
logits [T, L, E]. It is fitted to each layer's experts' activation mass on calibration tokens, as the per-layer
learned router is (`routers.learned_router`): target m_e / max_e' m_e', binary cross-entropy.

`use_pregate(model, pregate)` makes a native MoE model route by it (reversible: `remove_pregate`): each layer
then takes the pre-gate's top-k and weighs them by its own router's scores over those k, renormalised as the
family does (sigmoid x routed_scaling_factor for DeepSeek-V3, softmax otherwise), so a MoEfied model keeps its
weight-1 rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError

# In a folder of their own beside the model: moekit's loaders read every *.safetensors file at a checkpoint's top
# level as the model's weights, and a pre-gate's tensors there made them refuse the checkpoint.
PREGATE_DIR = "moekit-pregate"
PREGATE_WEIGHTS, PREGATE_CONFIG = f"{PREGATE_DIR}/pregate.safetensors", f"{PREGATE_DIR}/pregate.json"


class PreGate(nn.Module):
    """logits [B*T, L, E] of every layer's experts from input_ids [B, T]: out(relu(in([e_t, e_{t-1}]))), with
    e the (frozen) token embeddings and e_{-1} = 0 at a sequence's first token."""

    def __init__(self, embeddings: Tensor, num_layers: int, num_experts: int, k: int, dim: int = 128):
        super().__init__()
        self.num_layers, self.num_experts, self.k = num_layers, num_experts, k
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        hidden = embeddings.shape[1]
        self.inp = nn.Linear(2 * hidden, dim)
        self.out = nn.Linear(dim, num_layers * num_experts)

    def features(self, input_ids: Tensor) -> Tensor:
        ids = input_ids.view(-1, input_ids.shape[-1]).clamp(0, self.embeddings.shape[0] - 1)
        e = self.embeddings[ids]  # [B, T, H]
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return torch.cat([e, prev], dim=-1).flatten(0, 1)  # [B*T, 2H]

    def forward(self, input_ids: Tensor) -> Tensor:
        h = torch.relu(self.inp(self.features(input_ids)))
        return self.out(h).view(-1, self.num_layers, self.num_experts)

    @torch.no_grad()
    def experts(self, input_ids: Tensor) -> list[Tensor]:
        """Per MoE layer [B*T, k] expert ids, known before the model runs (the prefetcher's `pregate` callable)."""
        logits = self(input_ids)
        return [logits[:, i].topk(self.k, dim=-1).indices for i in range(self.num_layers)]

    def save(self, directory: str | os.PathLike) -> Path:
        """PREGATE_WEIGHTS and PREGATE_CONFIG (in the folder PREGATE_DIR) into `directory` (each written to a
        temporary name, then renamed). The token embeddings are not stored: `load` takes them from the model."""
        from safetensors.torch import save_file

        from moekit.files import atomic_write

        out = Path(directory)
        (out / PREGATE_DIR).mkdir(parents=True, exist_ok=True)
        meta = {"format": "moekit-pregate", "version": 1, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "k": self.k, "dim": self.inp.out_features,
                "vocab": self.embeddings.shape[0], "hidden": self.embeddings.shape[1]}
        weights = {n: t.contiguous() for n, t in self.state_dict().items() if n != "embeddings"}
        tmp = out / PREGATE_DIR / f".pregate.safetensors.tmp-{os.getpid()}"
        save_file(weights, tmp)
        os.replace(tmp, out / PREGATE_WEIGHTS)
        atomic_write(out / PREGATE_CONFIG, json.dumps(meta))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module) -> PreGate:
        """The pre-gate saved in `directory`, with `model`'s input embeddings; ConfigError naming the file when it
        is missing, malformed or made for another model."""
        from safetensors.torch import load_file

        d = Path(directory)
        try:
            meta = json.loads((d / PREGATE_CONFIG).read_text())
            emb = model.get_input_embeddings().weight
            if meta.get("format") != "moekit-pregate" or (meta["vocab"], meta["hidden"]) != tuple(emb.shape):
                raise ValueError(f"made for embeddings {meta.get('vocab')} x {meta.get('hidden')}, the model has "
                                 f"{tuple(emb.shape)}")
            gate = cls(emb, meta["num_layers"], meta["num_experts"], meta["k"], meta["dim"])
            gate.load_state_dict({**load_file(d / PREGATE_WEIGHTS), "embeddings": gate.embeddings})
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{d / PREGATE_CONFIG}: not a pre-gate for this model ({str(err).splitlines()[0]})"
                              ) from None
        return gate.eval()


def fit_pregate(embeddings: Tensor, windows: Sequence[Tensor], masses: Sequence[Tensor], k: int, steps: int = 300,
                lr: float = 1e-2, dim: int = 128, seed: int = 0) -> PreGate:
    """A PreGate fitted to per-layer expert masses: `windows` are the calibration token windows (ids [L_w] each,
    in the order `make.capture_inputs` reads them), `masses[l] [N, E]` each layer's expert activation mass on
    those tokens (N <= the windows' total; `routers.expert_mass`)."""
    if not masses:
        raise ConfigError("pregate: expected the expert masses of at least one layer")
    n, experts = masses[0].shape
    if any(m.shape != (n, experts) for m in masses):
        raise ConfigError("pregate: expected every layer's masses as [N, E] with the same N and E")
    gate = PreGate(embeddings, len(masses), experts, k, dim)
    feats = torch.cat([gate.features(w.view(1, -1)) for w in windows])[:n]
    if feats.shape[0] < n:
        raise ConfigError(f"pregate: the windows hold {feats.shape[0]} tokens; expected at least {n}")
    target = torch.stack([m / m.max(dim=1, keepdim=True).values.clamp_min(1e-12) for m in masses], dim=1).float()
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in gate.parameters() if p.requires_grad], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = gate.out(torch.relu(gate.inp(feats))).view(n, gate.num_layers, experts)
            F.binary_cross_entropy_with_logits(logits, target).backward()
            opt.step()
    return gate.eval()


@torch.no_grad()
def expert_masses(model: nn.Module, windows: Sequence[Tensor], max_tokens: int = 4096) -> list[Tensor]:
    """Per MoE layer of a native MoE `model` [N, E]: each expert's activation mass sum |act(g) * u| on the layer's
    inputs over the token windows (ids [L] each; N <= max_tokens), from the experts' own weights."""
    import moekit.hf as mh
    from moekit.make import capture_module_inputs

    blocks = mh.view(model)
    inputs = capture_module_inputs(model, windows, {i: b.block for i, b in enumerate(blocks)}, max_tokens)
    masses = []
    for i, b in enumerate(blocks):
        x = inputs[i]
        gate, up = torch.einsum("nh,ewh->new", x, b.experts.module.gate_up_proj.float()).chunk(2, dim=-1)
        masses.append((b.experts.module.act_fn(gate) * up).abs().sum(-1))
    return masses


def fit_pregate_for(model: nn.Module, windows: Sequence[Tensor], k: int | None = None, max_tokens: int = 4096,
                    **kwargs) -> PreGate:
    """A PreGate for a native MoE `model` from calibration windows: its experts' masses as targets, its input
    embeddings as features, k its experts per token unless given."""
    import moekit.hf as mh

    blocks = mh.view(model)
    if not blocks:
        raise ConfigError("pregate: the model has no MoE layer; expected a native MoE model")
    masses = expert_masses(model, windows, max_tokens)
    return fit_pregate(model.get_input_embeddings().weight, windows, masses, k or blocks[0].k, **kwargs)


class _PreGatedRouter(nn.Module):
    """A layer's router that routes by the pre-gate's choice for the current input ids and weighs the chosen
    experts by the original router's scores, renormalised as the family does."""

    def __init__(self, original: nn.Module, layer: int, state: dict, sigmoid: bool, scale: float):
        super().__init__()
        self.original, self.layer, self.state, self.sigmoid, self.scale = original, layer, state, sigmoid, scale

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)  # weight, top_k, e_score_correction_bias, ...

    def forward(self, hidden: Tensor):
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), self.weight.float())
        idx = self.state["choice"][self.layer]
        if idx.shape[0] != logits.shape[0]:
            raise ConfigError(f"pregate: {idx.shape[0]} routed tokens for {logits.shape[0]}; expected the model to "
                              "be called with input_ids")
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20) * self.scale
        return logits, w.to(hidden.dtype), idx


def use_pregate(model: nn.Module, gate: PreGate) -> None:
    """Route every MoE layer of a native transformers MoE `model` by `gate` (reversible with `remove_pregate`)."""
    import moekit.hf as mh

    blocks = mh.view(model)
    if len(blocks) != gate.num_layers or blocks[0].num_experts != gate.num_experts:
        raise ConfigError(f"pregate: made for {gate.num_layers} layers x {gate.num_experts} experts; expected the "
                          f"model's {len(blocks)} x {blocks[0].num_experts if blocks else 0}")
    if hasattr(model, "_moekit_pregate"):
        raise ConfigError("pregate: the model already routes by a pre-gate; expected remove_pregate first")
    state: dict = {}
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: state.__setitem__("choice", gate.experts(args[0])))
    originals = []
    for i, block in enumerate(blocks):
        sigmoid = block.family.routing.startswith("sigmoid")
        scale = float(getattr(model.config, "routed_scaling_factor", 1.0) or 1.0) if sigmoid else 1.0
        name = block.family.router
        originals.append((block.block, name, getattr(block.block, name)))
        setattr(block.block, name, _PreGatedRouter(block.router, i, state, sigmoid, scale))
    model._moekit_pregate = (handle, originals)


def remove_pregate(model: nn.Module) -> None:
    """Give back the routers `use_pregate` replaced."""
    handle, originals = model.__dict__.pop("_moekit_pregate", (None, []))
    if handle is None:
        raise ConfigError("pregate: the model does not route by a pre-gate")
    handle.remove()
    for block, name, router in originals:
        setattr(block, name, router)
