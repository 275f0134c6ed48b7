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
    """The neurons' input rows [I, H]: the gate projection of a gated FFN."""
    return mlp.gate_proj.weight.detach()


def centroid_router(mlp: nn.Module, partition: Tensor) -> Tensor:
    rows = F.normalize(input_rows(mlp).double(), dim=1)
    return torch.stack([rows[s].mean(0) for s in partition]).float()


def emoe_router(mlp: nn.Module, partition: Tensor) -> Tensor:
    rows = input_rows(mlp).double()
    return torch.stack([rows[s].mean(0) for s in partition]).float()


@torch.no_grad()
def activations(mlp: nn.Module, x: Tensor) -> Tensor:
    """The FFN's neuron activations [N, I] for inputs x [N, H]."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def expert_mass(acts: Tensor, partition: Tensor) -> Tensor:
    """[N, E]: each expert's share of |activation|, sum over its neurons."""
    return acts.abs()[:, partition].sum(-1)


def learned_router(mlp: nn.Module, partition: Tensor, x: Tensor, steps: int = 300, lr: float = 1e-2,
                   seed: int = 0) -> Tensor:
    """A linear router fitted to each expert's normalised activation mass on calibration inputs x [N, H]."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ConfigError(f"router=learned: expected calibration inputs [tokens >= 2, H]; got {tuple(x.shape)}")
    x = x.detach().float()
    mass = expert_mass(activations(mlp, x.to(mlp.gate_proj.weight.dtype)).float(), partition)
    target = mass / mass.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    torch.manual_seed(seed)
    start = centroid_router(mlp, partition)
    scale = 1.0 / (x.norm(dim=1).mean() * start.norm(dim=1).mean()).clamp_min(1e-12)
    weight = nn.Parameter(start * scale * 4)  # logits of order 1 at the start
    opt = torch.optim.Adam([weight], lr=lr)  # no bias: the native families' routers have none
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(x @ weight.t(), target).backward()
        opt.step()
    return weight.detach()
