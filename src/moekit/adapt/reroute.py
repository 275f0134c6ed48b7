"""Test-time rerouting (Rewiring Experts on the Fly, arXiv 2510.14853): per-layer additive vectors on the router
logits of a bridged Hugging Face MoE, fitted by self-supervision on the context, model weights frozen.

`reroute_online(model, layers=None, ...)` installs a zero vector `delta_l [E]` on the router of each chosen MoE
block (default: all) and returns a `Rerouting`. `fit(ids)` takes `steps` Adam steps on
L = CE(next tokens of ids) + reg * sum_l ||delta_l||^2 with only the vectors trainable (the penalty pulls the
vectors back toward the trained routing: refits accumulate, and without it the shifts drift by about lr per
coordinate per step, whatever the size of the gradient); `generate(ids, n)` fits on the prompt (prefill), then
every `interval` generated tokens on the whole sequence so far; `reset()` zeroes the vectors; `restore()` removes
everything and leaves the model exactly as it was (class forward, parameters, requires_grad flags).

With a vector installed, a block routes `logits + delta` by its family's own rule (moekit.hf.reference_routing's
rules: top-k selection, weights, groups, renormalisation), so the weights of the chosen experts carry the gradient
to delta. The instance `forward` on the router module is the same mechanism `moekit.hf.reroute` uses; the two
cannot be stacked (installing over another replacement is refused).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.routing import Routing, sigmoid_group_topk, softmax_group_topk, softmax_topk, topk_softmax
from moekit.errors import ConfigError
from moekit.hf.routing import sparsemixer_eval
from moekit.hf.view import BlockView, view

# Chosen on moekit-tiny v2's held-out split (docs/adapt.md). The former lr 0.05 without the pull moved logits by up
# to 2 over a long document (the 6th and 7th choices' scores differ by ~0.01) and cost 16% perplexity.
LR = 0.01
REG = 0.01


def route_logits(block: BlockView, hidden: Tensor, delta: Tensor | None) -> Routing:
    """The block's routing of hidden [T, H] with `delta` [E] added to its logits (the family's rule, as
    `moekit.hf.reference_routing` states it)."""
    router, kind, k, params = block.router, block.family.routing, block.k, block.router_params()
    fp32 = kind in ("softmax_group_topk", "sigmoid_group_topk")
    x, w = (hidden.float(), params["weight"].float()) if fp32 else (hidden, params["weight"])
    logits = F.linear(x, w, params.get("bias") if kind == "topk_softmax" else None)
    if delta is not None:
        logits = logits + delta.to(logits.dtype)
    if kind == "softmax_topk":
        return softmax_topk(logits, k, normalize=getattr(router, "norm_topk_prob", True))
    if kind == "softmax_group_topk":
        return softmax_group_topk(logits, k, method=router.topk_method, n_group=router.num_group or 1,
                                  topk_group=router.topk_group or 1, normalize=False,
                                  scaling=router.routed_scaling_factor)
    if kind == "sigmoid_group_topk":
        return sigmoid_group_topk(logits, k, correction_bias=params["e_score_correction_bias"],
                                  n_group=router.num_group, topk_group=router.topk_group,
                                  normalize=router.norm_topk_prob, scaling=router.routed_scaling_factor)
    if kind == "topk_softmax":
        return topk_softmax(logits, k)
    if kind == "sparsemixer":
        return sparsemixer_eval(logits, router.router_jitter_noise)
    raise ConfigError(f"routing={kind!r}: expected a routing kind of moekit.hf.families.ROUTING_KINDS")


class _ShiftedRouter:
    """Stands in for `router.forward(hidden) -> (logits, weights, indices)` with a learnable logit shift."""

    def __init__(self, block: BlockView):
        self.block = block
        self.delta = torch.zeros(block.num_experts, dtype=torch.float32, requires_grad=True)

    def __call__(self, hidden: Tensor, *_args, **_kwargs) -> tuple[Tensor, Tensor, Tensor]:
        flat = hidden.reshape(-1, hidden.shape[-1])
        r = route_logits(self.block, flat, self.delta)
        return r.logits, r.weights.to(hidden.dtype), r.indices


class Rerouting:
    """The handle `reroute_online` returns: `fit`, `generate`, `reset`, `restore`, `vectors()`."""

    def __init__(self, model: nn.Module, blocks: list[BlockView], interval: int, steps: int, lr: float,
                 reg: float = 0.0):
        self.model = model
        self.blocks = blocks
        self.interval = interval
        self.steps = steps
        self.lr = lr
        self.reg = reg
        self.shifts = [_ShiftedRouter(b) for b in blocks]
        for b, s in zip(blocks, self.shifts, strict=True):
            b.router.forward = s
        self.fit_seconds = 0.0
        self.fits = 0

    def vectors(self) -> dict[int, Tensor]:
        """{decoder layer: its logit shift [E]} (copies)."""
        return {b.layer: s.delta.detach().clone() for b, s in zip(self.blocks, self.shifts, strict=True)}

    def reset(self) -> None:
        with torch.no_grad():
            for s in self.shifts:
                s.delta.zero_()

    def fit(self, input_ids: Tensor) -> float:
        """`steps` Adam steps on the mean next-token loss of input_ids [B, T] (T >= 2) plus reg * sum ||delta||^2,
        only the vectors trainable. Returns the last step's next-token loss (before its update, without the
        penalty); the vectors keep what earlier fits learned."""
        if input_ids.shape[-1] < 2:
            raise ConfigError(f"input_ids: expected at least 2 tokens to fit on, got {input_ids.shape[-1]}")
        start = time.perf_counter()
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        opt = torch.optim.Adam([s.delta for s in self.shifts], lr=self.lr)
        loss = torch.tensor(float("nan"))
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = self.model(input_ids=input_ids).logits[:, :-1].float()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
                    penalty = self.reg * sum((s.delta ** 2).sum() for s in self.shifts)
                    opt.zero_grad()
                    (loss + penalty).backward()
                    opt.step()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        self.fit_seconds += time.perf_counter() - start
        self.fits += 1
        return float(loss.detach())

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **generate_kwargs) -> Tensor:
        """Greedy (or as `generate_kwargs` say) generation with a fit on the prompt and then on the whole sequence
        every `interval` new tokens. Returns prompt + new tokens [B, T + n]."""
        ids = input_ids
        while ids.shape[-1] - input_ids.shape[-1] < max_new_tokens:
            if ids.shape[-1] >= 2:
                self.fit(ids)
            n = min(self.interval, max_new_tokens - (ids.shape[-1] - input_ids.shape[-1]))
            ids = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      **generate_kwargs)
        return ids

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The model's own routing inside the block (the vectors are kept and come back after it)."""
        self.restore()
        try:
            yield
        finally:
            for b, s in zip(self.blocks, self.shifts, strict=True):
                b.router.forward = s

    def restore(self) -> nn.Module:
        """Remove the vectors: every router runs its class's forward again. Returns the model."""
        for b, s in zip(self.blocks, self.shifts, strict=True):
            if b.router.__dict__.get("forward") is s:
                del b.router.forward
        return self.model


def reroute_online(model: nn.Module, layers: list[int] | None = None, interval: int = 128, steps: int = 5,
                   lr: float = LR, reg: float = REG) -> Rerouting:
    """Install zero logit shifts on the routers of `layers` (decoder layer indices of MoE blocks; None: all) and
    return the `Rerouting` that fits them. interval: generated tokens between refits (the paper: ~128); lr: Adam's
    step on the shifts; reg: weight of the L2 pull toward zero (0: none)."""
    if not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"interval={interval!r}: expected a positive number of tokens between refits")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected a positive number of optimisation steps per fit")
    if not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"lr={lr!r}: expected a positive learning rate")
    if not reg >= 0 or not math.isfinite(reg):
        raise ConfigError(f"reg={reg!r}: expected a non-negative weight of the pull toward zero")
    blocks = view(model)
    by_layer = {b.layer: b for b in blocks}
    if layers is not None:
        unknown = [i for i in layers if i not in by_layer]
        if unknown or not layers:
            raise ConfigError(f"layers={layers}: expected MoE decoder layers among {sorted(by_layer)}")
        blocks = [by_layer[i] for i in dict.fromkeys(layers)]
    for b in blocks:
        if b.router.training and b.family.routing == "sparsemixer":
            raise ConfigError(f"layer {b.layer}: PhiMoE's sparsemixer samples in training mode; expected eval mode")
        if "forward" in b.router.__dict__:
            raise ConfigError(f"layer {b.layer}: {type(b.router).__name__}.forward is already replaced (reroute, "
                              "another reroute_online); expected the family's own forward")
    return Rerouting(model, blocks, interval, steps, lr, reg)
