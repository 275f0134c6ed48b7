"""Routers for experts split out of a dense FFN. Each returns router directions `[E, H]`; `convert` scales them.

- `centroid` (MoEfication's similarity router): w_e = the mean of the expert's L2-normalised input rows, so a token
  goes to the experts whose neurons point its way.
- `emoe` (EMoE's gate): w_e = the plain mean of the expert's input rows (keys), kept frozen.
- `learned` (MoEfication's learned router, linear as the native families' routers are): trained on calibration
  inputs x to predict each expert's activation mass m_e(x) = sum_{i in S_e} |a_i(x)| (a = act(W_gate x) * W_up x),
  with target t_e = m_e / max_e' m_e' and a binary cross-entropy on the logits, started from the centroids.
  The order of its logits is what picks the experts, so predicting which experts carry the most mass is the goal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError

ROUTERS = ("centroid", "emoe", "learned")


def input_rows(mlp: nn.Module) -> Tensor:
    """A gated FFN's neuron input rows [I, H]: its gate projection."""
    return mlp.gate_proj.weight.detach()


@torch.no_grad()
def activations(mlp: nn.Module, x: Tensor) -> Tensor:
    """A gated FFN's neuron activations [N, I] for inputs x [N, H]."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def centroid_router(rows: Tensor, partition: Tensor) -> Tensor:
    """rows [I, H] (one per neuron) -> [E, H]: the mean of each expert's L2-normalised rows."""
    rows = F.normalize(rows.detach().double(), dim=1)
    return torch.stack([rows[s].mean(0) for s in partition]).float()


def emoe_router(rows: Tensor, partition: Tensor) -> Tensor:
    rows = rows.detach().double()
    return torch.stack([rows[s].mean(0) for s in partition]).float()


def expert_mass(acts: Tensor, partition: Tensor, square: bool = False) -> Tensor:
    """[N, E]: each expert's share of the activations, sum over its neurons of |a| (or of a^2 with `square`)."""
    return (acts.square() if square else acts.abs())[:, partition].sum(-1)


def learned_router(rows: Tensor, partition: Tensor, x: Tensor, acts: Tensor, steps: int = 300, lr: float = 1e-2,
                   seed: int = 0, square: bool = False) -> Tensor:
    """A linear router fitted to each expert's normalised activation mass: inputs x [N, H], the FFN's neuron
    activations on them acts [N, I] (centred by the caller for G-MoEfication's target sum (a - mean a)^2, with
    `square`), started from the centroids of rows [I, H]."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ConfigError(f"router=learned: expected calibration inputs [tokens >= 2, H]; got {tuple(x.shape)}")
    x = x.detach().float()
    mass = expert_mass(acts.float(), partition, square)
    target = mass / mass.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    torch.manual_seed(seed)
    start = centroid_router(rows, partition)
    scale = 1.0 / (x.norm(dim=1).mean() * start.norm(dim=1).mean()).clamp_min(1e-12)
    weight = nn.Parameter(start * scale * 4)  # logits of order 1 at the start
    opt = torch.optim.Adam([weight], lr=lr)  # no bias: the native families' routers have none
    with torch.enable_grad():  # callers may hold no_grad around the conversion
        for _ in range(steps):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(x @ weight.t(), target).backward()
            opt.step()
    return weight.detach()


def make_router(kind: str, rows: Tensor, partition: Tensor, x: Tensor | None = None, acts: Tensor | None = None,
                seed: int = 0, square: bool = False) -> Tensor:
    """Router directions `[E, H]` of `kind` (one of ROUTERS); `learned` needs the calibration inputs x and the FFN's
    activations on them (centred by the caller when `square`)."""
    if kind == "centroid":
        return centroid_router(rows, partition)
    if kind == "emoe":
        return emoe_router(rows, partition)
    if kind == "learned":
        if x is None or acts is None:
            raise ConfigError("router=learned: needs calibration text (--data)")
        return learned_router(rows, partition, x, acts, seed=seed, square=square)
    raise ConfigError(f"router={kind!r}: expected one of {', '.join(ROUTERS)}")
