"""Compressed experts (Efficiently Editing Mixture-of-Experts Models with Compressed Experts), for moekit's MoE layer.

Of a token's k routed experts (best first) the `keep` most important run in full; the other, auxiliary, ones are
replaced by compressed experts, one per expert, each a rank-r linear part plus a width-r GELU part,

    C_e(x) = B_e A_e x + c_e + D_e gelu(U_e x)      (A_e, U_e [r, H]; B_e, D_e [H, r]),

fitted to the expert's own outputs on calibration tokens: the linear part by reduced-rank least squares (the full
least-squares map projected on the r leading principal directions of its fitted outputs), then all of it by
distillation (`steps` of Adam on the mean squared error to E_e(x)). The layer becomes

    y = sum_{j <= keep} w_j E_{i_j}(x) + sum_{keep < j <= k} w_j C_{i_j}(x)

with the router's weights unchanged. Active parameters per token fall from k P (P an expert's parameters) to
keep P + (k - keep)(4 r H + H). `CompressedMoE.fit` fits them; they stay parameters (editing fine-tunes them).
Dropping the auxiliary experts instead (`mode="drop"`) and replacing them by their mean output (`mode="mean"`)
are the baselines the test and the bench compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.layer import MoE
from moekit.core.routing import Routing
from moekit.core.step import Dispatcher
from moekit.errors import ConfigError, ShapeError

MODES = ("compressed", "drop", "mean")


@dataclass
class CompressedExpertsConfig:
    """keep: full experts per token (1 <= keep < k); rank: r of each compressed expert; steps / lr: the
    distillation."""

    keep: int = 1
    rank: int = 8
    steps: int = 200
    lr: float = 1e-2

    def check(self, k: int, hidden: int) -> None:
        if not isinstance(self.keep, int) or not 1 <= self.keep < k:
            raise ConfigError(f"keep={self.keep!r}: expected an integer from 1 to k - 1 = {k - 1}")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= hidden:
            raise ConfigError(f"rank={self.rank!r}: expected an integer from 1 to hidden_size={hidden}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps={self.steps!r}: expected a non-negative integer")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r}: expected a positive number")


def compressed_output(x: Tensor, a: Tensor, b: Tensor, c: Tensor, u: Tensor, d: Tensor) -> Tensor:
    """C(x) = B A x + c + D gelu(U x) for one compressed expert (a, u [r, H]; b, d [H, r]; c [H])."""
    return (x @ a.T) @ b.T + c + F.gelu(x @ u.T) @ d.T


@torch.no_grad()
def fit_compressed(x: Tensor, expert: Callable[[Tensor, int], Tensor], num_experts: int,
                   config: CompressedExpertsConfig, init_u: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Compressed forms of experts 0..E-1 (`expert(x, e)` -> [T, H]) fitted on x [T, H] as the module docstring
    says. Returns float32 {"a", "b", "c", "u", "d", "mean"} stacked over experts ("mean": each expert's mean output,
    the `mean` baseline)."""
    x = x.float()
    h, r = x.shape[-1], config.rank
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)  # [T, H + 1]
    out = {"a": torch.zeros(num_experts, r, h), "b": torch.zeros(num_experts, h, r), "c": torch.zeros(num_experts, h),
           "d": torch.zeros(num_experts, h, r), "mean": torch.zeros(num_experts, h),
           "u": (init_u.detach().float().clone() if init_u is not None
                 else torch.randn(num_experts, r, h, generator=generator) / h ** 0.5)}
    targets = []
    for e in range(num_experts):
        y = expert(x, e).double()  # [T, H]
        targets.append(y.float())
        w = torch.linalg.lstsq(design, y).solution  # [H + 1, H]
        fitted = design @ w
        centre = fitted.mean(0)
        _, _, vh = torch.linalg.svd(fitted - centre, full_matrices=False)
        p = vh[:r].T  # [H, r] principal output directions
        out["a"][e] = (w[:-1] @ p).T.float()  # x -> r coordinates
        out["b"][e] = p.float()
        out["c"][e] = (w[-1] @ p @ p.T + centre - centre @ p @ p.T).float()
        out["mean"][e] = y.mean(0).float()
    params = {k: nn.Parameter(out[k]) for k in ("a", "b", "c", "u", "d")}
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    best = {k: v.detach().clone() for k, v in params.items()}
    best_loss = torch.full((num_experts,), float("inf"))
    with torch.enable_grad():
        for step in range(config.steps + 1):
            opt.zero_grad()
            losses = torch.stack([(compressed_output(x, *(params[k][e] for k in "abcud")) - t).square().mean()
                                  for e, t in enumerate(targets)])
            with torch.no_grad():  # per expert, the best parameters seen (the least-squares start included)
                better = losses.detach() < best_loss
                for k, v in params.items():
                    best[k][better] = v.detach()[better]
                best_loss = torch.where(better, losses.detach(), best_loss)
            if step == config.steps:
                break
            losses.sum().backward()
            opt.step()
    return {**best, "mean": out["mean"]}


class CompressedMoE(nn.Module):
    """A trained `MoE` whose auxiliary experts run compressed (`CompressedExpertsConfig`)."""

    def __init__(self, moe: MoE, config: CompressedExpertsConfig):
        super().__init__()
        config.check(moe.k, moe.hidden_size)
        if moe.shared_experts is not None:
            raise ConfigError("CompressedMoE: expected a layer without shared experts")
        self.moe, self.config = moe, config
        e, h, r = moe.num_experts, moe.hidden_size, config.rank
        self.a = nn.Parameter(torch.zeros(e, r, h))
        self.b = nn.Parameter(torch.zeros(e, h, r))
        self.c = nn.Parameter(torch.zeros(e, h))
        self.u = nn.Parameter(torch.randn(e, r, h) / h ** 0.5)
        self.d = nn.Parameter(torch.zeros(e, h, r))
        self.mean = nn.Parameter(torch.zeros(e, h), requires_grad=False)

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Fit every compressed expert to its expert's outputs on the calibration tokens x [T, H]."""
        if x.dim() != 2 or x.shape[-1] != self.moe.hidden_size:
            raise ShapeError(f"x: expected [T, {self.moe.hidden_size}], got {list(x.shape)}")
        fitted = fit_compressed(x, self.moe.experts.expert, self.moe.num_experts, self.config, init_u=self.u)
        for name, t in fitted.items():
            getattr(self, name).copy_(t)

    def compressed(self, x: Tensor, e: int) -> Tensor:
        return compressed_output(x, self.a[e], self.b[e], self.c[e], self.u[e], self.d[e])

    def forward(self, x: Tensor, mode: str = "compressed") -> Tensor:
        """x [T, H] -> [T, H]; mode: compressed | drop (auxiliary experts left out) | mean (their mean output)."""
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        routing = self.moe.router(x)
        keep = self.config.keep
        full = Routing(routing.logits, routing.weights[:, :keep], routing.indices[:, :keep])
        y = Dispatcher(self.moe.experts, None, "auto")(x, full).out
        if mode == "drop":
            return y
        for j in range(keep, routing.k):
            w, idx = routing.weights[:, j:j + 1].to(x.dtype), routing.indices[:, j]
            for e in torch.unique(idx).tolist():
                tok = torch.nonzero(idx == e).flatten()
                part = self.mean[e].expand(len(tok), -1) if mode == "mean" else self.compressed(x[tok], e)
                y = y.index_add(0, tok, w[tok] * part)
        return y

    def active_parameters(self) -> dict[str, int]:
        """Per token: the routed experts' parameters in full and with compressed auxiliary experts."""
        per_expert = sum(p[0].numel() for p in self.moe.experts.parameters())
        h, r, k, keep = self.moe.hidden_size, self.config.rank, self.moe.k, self.config.keep
        return {"full": k * per_expert, "compressed": keep * per_expert + (k - keep) * (4 * r * h + h)}
