"""AdvMoE (Robust Mixture-of-Expert Training for CNNs): routers and experts trained adversarially in alternation.

Vanilla adversarial training (AT) minimises E max_{||d||_inf <= eps} CE(f(x + d), y) over all parameters at once.
AdvMoE splits the parameters into the routers' phi and the rest theta (experts and backbone) and alternates, each
step on adversarial examples made against the current model:

    router step:  phi   <- phi   - lr grad_phi   CE(f_{theta, phi}(x + d*), y)     (theta fixed)
    expert step:  theta <- theta - lr grad_theta CE(f_{theta, phi}(x + d*), y)     (phi fixed)

with d* from PGD (`pgd_attack`: random start in the eps ball, `steps` signed-gradient steps of size `alpha`,
projected back onto the ball and onto the data range [lo, hi]). `AdvMoETrainer.step` does one of the two;
`schedule` says which (by default they alternate every step). `vanilla_at_step` is the baseline.

`TradesAdvMoE` follows the authors' code (OPTML-Group/Robust-MoE-CNN `train_moe.py`): per batch an expert step,
then a router step, each on fresh adversarial examples that maximise KL(f(x') || f(x)) + KL(r(x') || r(x)) (model
and router outputs, PGD from x + 0.001 noise):

    expert step:  CE(f(x), y) + beta  KL(f(x*) || f(x))        (TRADES, on theta)
    router step:  CE(r(x), y mod E) + alpha_r KL(r(x*) || r(x)) (on phi; the code supervises the router with the
                  class index modulo the number of experts)

with r(x) the router's logits (`router_logits`, e.g. the per-sample router scores of a one-layer MoE classifier, or
of `moekit.bench.seed_tasks.ConvMoENet`, the MoE CNN built as the authors' code builds theirs: channel-group experts
in every convolution, one image router).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError


@dataclass
class PGDConfig:
    """eps: the L-inf radius; alpha: step size; steps; lo / hi: the data range."""

    eps: float = 0.1
    alpha: float = 0.025
    steps: int = 5
    lo: float = 0.0
    hi: float = 1.0

    def check(self) -> None:
        for name in ("eps", "alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a non-negative number")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps={self.steps!r}: expected a non-negative integer")


def pgd_attack(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, config: PGDConfig,
               generator: torch.Generator | None = None) -> Tensor:
    """x + d*, ||d*||_inf <= eps, within [lo, hi]: PGD on the cross-entropy (gradients of the model untouched)."""
    config.check()
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * config.eps
    adv = (x + delta).clamp(config.lo, config.hi).detach()
    for _ in range(config.steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + config.alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - config.eps), x + config.eps).clamp(config.lo, config.hi)
    return adv.detach()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(router parameters: every parameter under a module or name containing 'router', the rest)."""
    routers, rest = [], []
    for name, p in model.named_parameters():
        (routers if any("router" in part for part in name.split(".")) else rest).append(p)
    if not routers:
        raise ConfigError("model: no parameter named '*router*'; expected an MoE model with routers")
    return routers, rest


class AdvMoETrainer:
    """Alternating router / expert adversarial training of `model` (logits = model(x))."""

    def __init__(self, model: nn.Module, pgd: PGDConfig | None = None, lr: float = 1e-2,
                 schedule: Callable[[int], str] | None = None):
        self.model, self.pgd = model, pgd or PGDConfig()
        self.pgd.check()
        self.routers, self.experts = split_parameters(model)
        self.opt_router = torch.optim.Adam(self.routers, lr=lr)
        self.opt_experts = torch.optim.Adam(self.experts, lr=lr)
        self.schedule = schedule or (lambda i: "router" if i % 2 == 0 else "experts")
        self.count = 0

    def step(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[str, float]:
        """One adversarial step of the phase the schedule names; returns (phase, loss)."""
        phase = self.schedule(self.count)
        if phase not in ("router", "experts"):
            raise ConfigError(f"schedule({self.count}) = {phase!r}: expected 'router' or 'experts'")
        self.count += 1
        adv = pgd_attack(self.model, x, y, self.pgd, generator)
        opt = self.opt_router if phase == "router" else self.opt_experts
        self.opt_router.zero_grad(set_to_none=True)
        self.opt_experts.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(adv), y)
        loss.backward()
        opt.step()
        return phase, float(loss.detach())


def vanilla_at_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, pgd: PGDConfig,
                    generator: torch.Generator | None = None) -> float:
    """The baseline: one adversarial step on every parameter at once."""
    adv = pgd_attack(model, x, y, pgd, generator)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(adv), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, pgd: PGDConfig,
                    generator: torch.Generator | None = None) -> float:
    return accuracy(model, pgd_attack(model, x, y, pgd, generator), y)


def _kl(logits: Tensor, target_log_probs: Tensor) -> Tensor:
    """sum over samples of KL(target || softmax(logits)) (torch's KLDivLoss convention, in log space: stable
    where a probability underflows to 0)."""
    return F.kl_div(F.log_softmax(logits, -1), target_log_probs, reduction="sum", log_target=True)


def trades_attack(model: Callable[[Tensor], Tensor], router_logits: Callable[[Tensor], Tensor], x: Tensor,
                  config: PGDConfig, generator: torch.Generator | None = None) -> Tensor:
    """x* maximising KL(f(x*) || f(x)) + KL(r(x*) || r(x)) by PGD from x + 0.001 noise (the authors' attack)."""
    config.check()
    with torch.no_grad():
        p_nat, q_nat = F.log_softmax(model(x), -1), F.log_softmax(router_logits(x), -1)
    adv = (x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device)).detach()
    for _ in range(config.steps):
        adv.requires_grad_(True)
        loss = _kl(model(adv), p_nat) + _kl(router_logits(adv), q_nat)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + config.alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - config.eps), x + config.eps).clamp(config.lo, config.hi)
    return adv.detach()


class TradesAdvMoE:
    """The authors' AdvMoE step: an expert (TRADES) step, then a router step, per batch (module docstring)."""

    def __init__(self, model: nn.Module, router_logits: Callable[[Tensor], Tensor], num_experts: int,
                 pgd: PGDConfig | None = None, lr: float = 1e-2, beta: float = 6.0, router_alpha: float = 1.0):
        for name, value in (("beta", beta), ("router_alpha", router_alpha)):
            if not value >= 0:
                raise ConfigError(f"{name}={value!r}: expected a non-negative number")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ConfigError(f"num_experts={num_experts!r}: expected a positive integer")
        self.model, self.router_logits, self.num_experts = model, router_logits, num_experts
        self.pgd, self.beta, self.router_alpha = pgd or PGDConfig(), beta, router_alpha
        self.pgd.check()
        self.routers, self.experts = split_parameters(model)
        self.opt_router = torch.optim.Adam(self.routers, lr=lr)
        self.opt_experts = torch.optim.Adam(self.experts, lr=lr)

    def step(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        n = x.shape[0]
        adv = trades_attack(self.model, self.router_logits, x, self.pgd, generator)
        logits = self.model(x)
        expert_loss = F.cross_entropy(logits, y) + self.beta / n * _kl(self.model(adv), F.log_softmax(logits, -1))
        self.opt_experts.zero_grad(set_to_none=True)
        self.opt_router.zero_grad(set_to_none=True)
        expert_loss.backward()
        self.opt_experts.step()
        adv = trades_attack(self.model, self.router_logits, x, self.pgd, generator)
        scores = self.router_logits(x)
        router_loss = F.cross_entropy(scores, y % self.num_experts) + self.router_alpha / n * _kl(
            self.router_logits(adv), F.log_softmax(scores, -1))
        self.opt_experts.zero_grad(set_to_none=True)
        self.opt_router.zero_grad(set_to_none=True)
        router_loss.backward()
        self.opt_router.step()
        return {"expert_loss": float(expert_loss.detach()), "router_loss": float(router_loss.detach())}
