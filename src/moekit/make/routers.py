"""Routers for experts split out of a dense FFN. Each returns router directions `[E, H]`; `convert` scales them.

- `centroid` (MoEfication's similarity router): w_e = the mean of the expert's L2-normalised input rows, so a token
  goes to the experts whose neurons point its way.
- `emoe` (EMoE's gate): w_e = the plain mean of the expert's input rows (keys), kept frozen.
- `learned` (MoEfication's learned router, linear as the native families' routers are): trained on calibration
  inputs x to predict each expert's activation mass m_e(x) = sum_{i in S_e} |a_i(x)| (a = act(W_gate x) * W_up x),
  with target t_e = m_e / max_e' m_e' and a binary cross-entropy on the logits, started from the centroids.
  The order of its logits is what picks the experts, so predicting which experts carry the most mass is the goal.
- `dino` (Dynamic-DINO's router initialisation, as we read its abstract: "a pre-trained weight allocation strategy
  for the experts, coupled with a specific router initialization" so that fine-tuning starts without degradation):
  the FFN is split into k pieces (by the chosen partition), each piece copied E/k times (expert g * E/k + c is
  copy c of piece g), and the router is a random [E/k, H] matrix tiled k times, so the logits of the k copies c of
  the pieces are equal: the top-k always takes one copy of every piece, at equal weights, and the MoE equals the
  dense FFN exactly at step 0 for any k < E (`dino_router`; the choice between copies is what training learns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError

ROUTERS = ("centroid", "emoe", "learned", "dino", "factorllm")
DATA_ROUTERS = ("learned", "factorllm")  # fitted on calibration inputs (--data)


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


def pa_prior(contrib: Tensor, tau: float = 1.0) -> Tensor:
    """FactorLLM's prior [N, E] from the experts' contributions [N, E] (>= 0): softmax_e(c_e / (tau * mean_e c))."""
    scale = contrib.mean(dim=-1, keepdim=True).clamp_min(1e-12) * tau
    return torch.softmax(contrib / scale, dim=-1)


def pa_loss(logits: Tensor, prior: Tensor) -> Tensor:
    """The Prior-Approximate loss: mean over tokens of KL(prior || softmax(logits)), logits and prior [N, E]."""
    return F.kl_div(F.log_softmax(logits, dim=-1), prior, reduction="batchmean")


def expert_contributions(acts: Tensor, partition: Tensor, down: Tensor | None = None) -> Tensor:
    """[N, E]: each expert's output norm ||W_down[:, S_e] a_{S_e}|| for activations acts [N, I] and the down
    projection down [H, I] (the columns of the split neurons), or its activation mass without `down`."""
    if down is None:
        return expert_mass(acts, partition)
    return torch.stack([(acts[:, s] @ down[:, s].t()).norm(dim=-1) for s in partition], dim=-1)


def factorllm_router(rows: Tensor, partition: Tensor, x: Tensor, acts: Tensor, down: Tensor | None = None,
                     tau: float = 1.0, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> Tensor:
    """A linear router [E, H] trained by the PA loss (`pa_loss`) towards `pa_prior` of the experts' contributions
    (`expert_contributions`) on calibration inputs x [N, H]; only the router moves."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ConfigError(f"router=factorllm: expected calibration inputs [tokens >= 2, H]; got {tuple(x.shape)}")
    if not tau > 0:
        raise ConfigError(f"router=factorllm: tau={tau}; expected a positive temperature")
    x = x.detach().float()
    with torch.no_grad():
        prior = pa_prior(expert_contributions(acts.float(), partition, None if down is None else down.float()), tau)
    torch.manual_seed(seed)
    start = centroid_router(rows, partition)
    scale = 1.0 / (x.norm(dim=1).mean() * start.norm(dim=1).mean()).clamp_min(1e-12)
    weight = nn.Parameter(start * scale * 4)  # logits of order 1 at the start
    opt = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            pa_loss(x @ weight.t(), prior).backward()
            opt.step()
    return weight.detach()


def make_router(kind: str, rows: Tensor, partition: Tensor, x: Tensor | None = None, acts: Tensor | None = None,
                seed: int = 0, square: bool = False, down: Tensor | None = None) -> Tensor:
    """Router directions `[E, H]` of `kind` (one of ROUTERS); `learned` and `factorllm` need the calibration inputs
    x and the FFN's activations on them (centred by the caller when `square`); `factorllm` uses the down projection
    `down` [H, I] (the split neurons' columns) for the experts' output norms."""
    if kind == "centroid":
        return centroid_router(rows, partition)
    if kind == "emoe":
        return emoe_router(rows, partition)
    if kind == "learned":
        if x is None or acts is None:
            raise ConfigError("router=learned: needs calibration text (--data)")
        return learned_router(rows, partition, x, acts, seed=seed, square=square)
    if kind == "factorllm":
        if x is None or acts is None:
            raise ConfigError("router=factorllm: needs calibration text (--data)")
        return factorllm_router(rows, partition, x, acts, down, seed=seed)
    if kind == "dino":
        raise ConfigError("router=dino: copies k pieces of the FFN into E experts; expected a dense decoder "
                          "(`make.moefy`), not a router over an existing split")
    raise ConfigError(f"router={kind!r}: expected one of {', '.join(ROUTERS)}")


def dino_router(experts: int, k: int, hidden: int, seed: int = 0, init_std: float = 0.02) -> Tensor:
    """Dynamic-DINO's router [E, H]: a random [E/k, H] (normal, std `init_std`) tiled k times, for experts ordered
    piece-major (expert g * E/k + c is copy c of piece g), so every piece's copy c has the same logit."""
    for name, value in (("experts", experts), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"router=dino: {name}={value!r}; expected a positive integer")
    if experts % k:
        raise ConfigError(f"router=dino: experts={experts} is not a multiple of k={k}; expected E/k copies of each "
                          "of the k pieces of the FFN")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(experts // k, hidden, generator=g) * init_std).repeat(k, 1)


# D2DMoE: a router that regresses each expert's output norm, and a dynamic number of experts per token.

def expert_output_norms(mlp: nn.Module, partition: Tensor, x: Tensor) -> Tensor:
    """[N, E]: the L2 norm of each expert's output ||W_down[:, S_e] a_{S_e}(x)|| for inputs x [N, H] (a gated
    FFN with gate_proj / up_proj / down_proj)."""
    with torch.no_grad():
        a = activations(mlp, x)  # [N, I]
        down = mlp.down_proj.weight  # [H, I]
        return torch.stack([(a[:, s] @ down[:, s].t()).norm(dim=-1) for s in partition], dim=-1)


class NormRouter(nn.Module):
    """D2DMoE's router: a small MLP x [T, H] -> predicted output norm of every expert [T, E]."""

    def __init__(self, hidden: int, experts: int, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, dim), nn.ReLU(), nn.Linear(dim, experts))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def fit_norm_router(x: Tensor, norms: Tensor, steps: int = 500, lr: float = 1e-2, dim: int = 64,
                    seed: int = 0) -> NormRouter:
    """A NormRouter fitted by mean squared error to the experts' output norms `norms [N, E]` on inputs x [N, H]
    (targets divided by their mean, so the fit does not depend on the FFN's scale; predictions are scaled back)."""
    if x.dim() != 2 or x.shape[0] < 2 or norms.shape != (x.shape[0], norms.shape[-1]):
        raise ConfigError(f"router=norm: expected inputs [N >= 2, H] and norms [N, E]; got {tuple(x.shape)} and "
                          f"{tuple(norms.shape)}")
    torch.manual_seed(seed)
    x, norms = x.detach().float(), norms.detach().float()
    scale = norms.mean().clamp_min(1e-12)
    router = NormRouter(x.shape[1], norms.shape[1], dim)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(router(x), norms / scale).backward()
            opt.step()
    with torch.no_grad():
        last = router.net[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return router.eval()


def dynamic_k(predicted: Tensor, tau: float, rule: str = "mass") -> Tensor:
    """Which experts each token uses [T, E] (bool) from predicted output norms [T, E]. `mass`: the fewest experts,
    largest first, whose predicted norms reach a fraction tau of the token's total; `max` (the D2DMoE paper's
    rule): every expert whose predicted norm is at least tau x the token's largest. At least one per token."""
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"tau={tau}: expected a fraction in [0, 1]")
    norms = predicted.clamp_min(0)
    if rule == "max":
        mask = norms >= tau * norms.max(dim=-1, keepdim=True).values
    elif rule == "mass":
        values, order = norms.sort(dim=-1, descending=True)
        before = values.cumsum(-1) - values  # mass of the experts ranked above
        keep = before < tau * values.sum(-1, keepdim=True)
        mask = torch.zeros_like(keep).scatter(-1, order, keep)
    else:
        raise ConfigError(f"rule={rule!r}: expected mass or max")
    mask[torch.arange(mask.shape[0]), norms.argmax(-1)] = True
    return mask


def dynamic_ffn(mlp: nn.Module, partition: Tensor, mask: Tensor, x: Tensor) -> Tensor:
    """The FFN's output [N, H] from only the experts `mask [N, E]` selects, each at weight 1 (the reference a
    runtime with dynamic k computes)."""
    a = activations(mlp, x)
    keep = torch.zeros_like(a)
    for e, s in enumerate(partition):
        keep[:, s] = mask[:, e:e + 1].to(a.dtype)
    return (a * keep) @ mlp.down_proj.weight.t()
