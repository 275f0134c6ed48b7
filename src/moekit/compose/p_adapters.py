"""P-Adapters' input-conditioned variant (Newman et al.): a small network maps the input's representation to a
continuous prompt, here a mixture over prompt experts with input-dependent weights:

    r(x)    = mean over the input's tokens of its input embeddings ("embedding") or of the frozen base model's last
              hidden states ("hidden")
    w(x)    = softmax(W_2 · GELU(W_1 · LayerNorm(r(x))))                                  [E]
    prompt  = Σ_e w_e(x) · P_e                                                           [P, H]

P_e are the prompt experts (one continuous prompt per expert, e.g. trained per category by
moekit.compose.model_routing.train_prompt; the MoE variant picks one of them with a classifier, this variant mixes
them). `train_p_adapter` trains the P-Adapter's parameters only (the network, and the prompt experts unless frozen);
the base model is frozen and unchanged. Forced weights (`forced=e`, or a one-hot `weights=`) give prompt expert e
exactly.

The representation is computed from `route_ids` when given, else from the input itself. In the paper the input is a
query whose answer is not part of it; on language-modelling windows the mean over the whole window sees tokens the
model is then scored on (a mild leak through one pooled vector): for perplexity pass the context as route_ids.
Saved as safetensors (tensors, and the names and settings in the file's metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, UnknownNameError
from moekit.files import atomic_write

REPRESENTATIONS = ("embedding", "hidden")


class PAdapterError(ConfigError):
    """A P-Adapter file or its settings cannot be used."""


class PAdapter(nn.Module):
    """Prompt experts [E, P, H] and the network mapping an input representation [B, H] to weights [B, E]."""

    def __init__(self, prompts: dict[str, Tensor], hidden: int = 64, representation: str = "embedding",
                 train_prompts: bool = True, seed: int = 0) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise UnknownNameError(f"representation {representation!r}: unknown; expected one of "
                                   f"{', '.join(REPRESENTATIONS)}")
        if not prompts:
            raise PAdapterError("P-Adapter: no prompt experts; expected at least one continuous prompt")
        shapes = {tuple(p.shape) for p in prompts.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise PAdapterError(f"P-Adapter: prompt shapes {sorted(shapes)}; expected one shape [tokens, hidden]")
        self.names = list(prompts)
        self.representation = representation
        self.prompts = nn.Parameter(torch.stack([p.detach().float() for p in prompts.values()]),
                                    requires_grad=train_prompts)
        size = self.prompts.shape[-1]
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(size)
        self.proj = nn.Linear(size, hidden)
        self.out = nn.Linear(hidden, len(self.names))
        with torch.no_grad():
            for lin in (self.proj, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.zero_()

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def weights(self, rep: Tensor) -> Tensor:
        """[B, E] mixture weights for representations [B, H]."""
        return torch.softmax(self.out(F.gelu(self.proj(self.norm(rep.float())))), dim=-1)

    def prompt(self, weights: Tensor) -> Tensor:
        """[B, P, H]: Σ_e w_e P_e."""
        return torch.einsum("be,eph->bph", weights, self.prompts)


class PAdapterLM(nn.Module):
    """The frozen LM with the P-Adapter's prompt before every input; forward returns logits for the input positions
    only, and keeps the last weights [B, E] in `last_weights`."""

    def __init__(self, model: nn.Module, adapter: PAdapter) -> None:
        super().__init__()
        hidden = model.get_input_embeddings().weight.shape[1]
        if adapter.prompts.shape[-1] != hidden:
            raise PAdapterError(f"P-Adapter: prompts of width {adapter.prompts.shape[-1]}; expected the model's "
                                f"hidden size {hidden}")
        self.model, self.adapter = model, adapter
        self.last_weights: Tensor | None = None

    def representation(self, ids: Tensor) -> Tensor:
        if self.adapter.representation == "embedding":
            return self.model.get_input_embeddings()(ids).float().mean(1)
        with torch.no_grad():
            return self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float().mean(1)

    def route(self, ids: Tensor) -> Tensor:
        return self.adapter.weights(self.representation(ids))

    def forward(self, input_ids: Tensor, route_ids: Tensor | None = None, forced: int | None = None,
                weights: Tensor | None = None) -> SimpleNamespace:
        b = input_ids.shape[0]
        if forced is not None:
            if not 0 <= forced < self.adapter.n_experts:
                raise PAdapterError(f"forced={forced}: expected an expert index below {self.adapter.n_experts}")
            weights = F.one_hot(torch.tensor([forced] * b), self.adapter.n_experts).float()
        elif weights is None:
            weights = self.route(input_ids if route_ids is None else route_ids)
        self.last_weights = weights.detach()
        embeds = self.model.get_input_embeddings()(input_ids)
        prefix = self.adapter.prompt(weights.to(self.adapter.prompts.device)).to(embeds.dtype)
        logits = self.model(inputs_embeds=torch.cat([prefix, embeds], dim=1)).logits
        return SimpleNamespace(logits=logits[:, prefix.shape[1]:])


def train_p_adapter(model: nn.Module, adapter: PAdapter, windows: Tensor, steps: int = 100, lr: float = 1e-2,
                    batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Train the P-Adapter's parameters on windows [N, L] with the base model frozen (its requires_grad flags are
    restored after). Returns moekit.compose.loop.fit's summary."""
    from moekit.compose.loop import fit

    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return fit(PAdapterLM(model, adapter), windows, list(adapter.parameters()), steps, lr, batch_size, seed,
                   progress=progress, desc="p-adapter")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])


def save_p_adapter(adapter: PAdapter, out: str | os.PathLike, inputs: list = ()) -> Path:
    from safetensors.torch import save as save_bytes

    from moekit.files import check_output

    path = check_output(out, inputs, flag="--out", directory=False, error=PAdapterError)
    meta = {"moekit": "p-adapter", "names": json.dumps(adapter.names), "representation": adapter.representation,
            "hidden": str(adapter.proj.out_features)}
    state = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    atomic_write(path, save_bytes(state, metadata=meta))
    return path


def is_p_adapter_file(path: str | os.PathLike) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("moekit") == "p-adapter"
    except Exception:  # noqa: BLE001 - anything that is not a safetensors file is not a P-Adapter
        return False


def load_p_adapter(path: str | os.PathLike) -> PAdapter:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
        if meta.get("moekit") != "p-adapter":
            raise KeyError("moekit")
        names = json.loads(meta["names"])
        prompts = dict(zip(names, state["prompts"], strict=True))
        adapter = PAdapter(prompts, int(meta["hidden"]), meta["representation"])
        adapter.load_state_dict(state)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        raise PAdapterError(f"{path}: not a P-Adapter file ({type(e).__name__}: {e}); expected the safetensors "
                            f"file written by moekit.compose.p_adapters.save_p_adapter") from None
    return adapter
