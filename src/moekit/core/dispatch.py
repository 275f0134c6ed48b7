"""Dispatch: send each token to its experts and combine the weighted results. The hot path.

Dropless sort-by-expert: one stable argsort of the flattened assignments gives contiguous per-expert slices;
each expert that received tokens runs one GEMM on its slice (or all of them in one `torch._grouped_mm`); the
weighted outputs are added back per token with `index_add_`. Nothing is padded to E x capacity.

Capacity mode (Switch / GShard): each expert keeps at most `capacity` assignments. Priority goes to first
choices over second choices (slot-major order), then to earlier tokens; an assignment over capacity is dropped,
so its weight is lost and a token with every assignment dropped contributes nothing (the residual carries it).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from moekit.core import tune
from moekit.core.experts.base import ExpertsLike, linear
from moekit.core.routing import Routing
from moekit.errors import ConfigError, RoutingError

DISPATCH_IMPLS = ("auto", "loop", "grouped_mm", "threads")
_GEMV_ROWS = 8  # reading an expert's weights costs about as much as this many rows of its GEMM
# `default_impl` (MOEKIT_TUNE=0, or under autograd): thresholds measured once on a 2-core AMD EPYC (Zen 4). The
# thread pool paid a fixed few milliseconds per call there (OpenMP's idle threads spin on a core after every parallel
# op of the calling thread), so it needed this much work to win: weights read or GEMM FLOPs.
_THREADS_MIN_BYTES = 64 * 2**20
_THREADS_MIN_FLOPS = 4 * 10**9
_THREADS_MIN_ROWS = 2  # decode (about one row per expert) is faster with one BLAS call per expert on all cores
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class DispatchPlan:
    """Assignments sorted by expert. token / expert / weight: [N]; counts: assignments per expert (Python ints,
    one host sync per forward); dropped: assignments over capacity."""

    token: Tensor
    expert: Tensor
    weight: Tensor
    counts: list[int]
    dropped: int = 0


def capacity_for(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Switch Transformer expert capacity: ceil(factor * T * k / E)."""
    if not factor > 0:
        raise ConfigError(f"capacity_factor={factor}: expected a positive number")
    return math.ceil(factor * num_tokens * k / num_experts)


def plan_dispatch(routing: Routing, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the assignments of `routing` by expert, dropping those over `capacity` (None: dropless)."""
    return plan_assignments(routing.indices, routing.weights, num_experts, capacity, routing.mask)


def plan_assignments(indices: Tensor, weights: Tensor, num_experts: int, capacity: int | None = None,
                     mask: Tensor | None = None) -> DispatchPlan:
    """`plan_dispatch` from the routing decision alone: indices / weights / mask [T, k] (no logits needed, as in
    a transformers experts forward)."""
    num_tokens, k = indices.shape
    # slot-major flattening: every token's first choice precedes any second choice (GShard priority)
    expert = indices.t().reshape(-1)
    weight = weights.t().reshape(-1)
    token = torch.arange(num_tokens, device=expert.device).repeat(k)
    if mask is not None:
        keep = mask.t().reshape(-1)
        expert, weight, token = expert[keep], weight[keep], token[keep]
    if expert.numel():
        lo, hi = (int(v) for v in torch.aminmax(expert))
        if lo < 0 or hi >= num_experts:
            raise RoutingError(f"routing.indices: expected expert ids in [0, {num_experts}), got [{lo}, {hi}]")
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    dropped = 0
    if capacity is not None:
        sorted_expert = expert[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]
        kept = rank < capacity
        dropped = int(order.numel() - kept.sum())
        order = order[kept]
        counts = counts.clamp(max=capacity)
    return DispatchPlan(token[order], expert[order], weight[order], counts.tolist(), dropped)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's CPU backward fails on
    a stride-0 gradient (as produced by `.sum()` or `expand`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ARG004
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ARG004
        return grad.contiguous()


def _grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, bias: Tensor | None, expert: Tensor) -> Tensor:
    """x [N, in] sorted by expert, weight [E, in, out] -> [N, out]."""
    out = _ContiguousGrad.apply(torch._grouped_mm(x, weight, offs=offsets))
    return out if bias is None else out + bias[expert]


def _run_grouped(xs: Tensor, plan: DispatchPlan, experts: ExpertsLike) -> Tensor:
    offsets = torch.tensor(plan.counts, device=xs.device).cumsum(0).to(torch.int32)
    w_up, w_down = experts.grouped_weights()
    h = _grouped_linear(xs, w_up, offsets, experts.gate_up_proj_bias, plan.expert)
    return _grouped_linear(experts.act(h), w_down, offsets, experts.down_proj_bias, plan.expert)


def _slices(plan: DispatchPlan) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert that received assignments."""
    out, start = [], 0
    for e, n in enumerate(plan.counts):
        if n:
            out.append((e, start, start + n))
            start += n
    return out


def _run_loop(xs: Tensor, plan: DispatchPlan, experts: ExpertsLike) -> Tensor:
    outs = [experts.expert(xs[s:t], e) for e, s, t in _slices(plan)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads that each run their BLAS calls on one core (torch's thread count is per thread)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="moekit-experts", initializer=_init_worker)


def _init_worker() -> None:
    torch.set_num_threads(1)
    tune.suspend_in_this_thread()  # timings taken beside the other workers would mislead


def _work_groups(plan: DispatchPlan, workers: int, split: bool) -> list[list[tuple[int, int, int]]]:
    """Expert slices in `workers` groups of about equal cost, largest first to the least loaded worker. The cost of
    a slice is its rows plus a constant for reading the expert's weights. With `split`, an expert with more than
    its share of rows is cut into row chunks first (forward only: in backward one thread owns each expert's
    weight gradient)."""
    slices = _slices(plan)
    if split:
        share = max(1, math.ceil(sum(t - s for _, s, t in slices) / workers))
        slices = [(e, c, min(c + share, t)) for e, s, t in slices for c in range(s, t, share)]
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    load = [0] * workers
    for sl in sorted(slices, key=lambda sl: sl[2] - sl[1], reverse=True):
        i = load.index(min(load))
        groups[i].append(sl)
        load[i] += sl[2] - sl[1] + _GEMV_ROWS
    return [g for g in groups if g]


def _run_threads(xs: Tensor, plan: DispatchPlan, experts: ExpertsLike) -> Tensor:
    """Experts side by side on a thread pool, each GEMM on one core.

    On a CPU one BLAS call split over all cores is less efficient for an expert-sized GEMM (a few hundred rows) than
    one core per GEMM with the experts in parallel, and a matrix-vector product (decode) on one core cannot use all
    cores' memory bandwidth; experts in parallel do. torch releases the GIL inside each op. Under autograd the
    backward pass runs on the pool too (`_ThreadedExperts`)."""
    weights = (experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_bias, experts.down_proj_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xs, *weights)):
        return _ThreadedExperts.apply(xs, plan, experts, *weights)
    ys, _ = _threaded_forward(xs, plan, experts, keep_hidden=False)
    return ys


def _threaded_forward(xs: Tensor, plan: DispatchPlan, experts: ExpertsLike, keep_hidden: bool) -> tuple[Tensor, Tensor]:
    ys = xs.new_empty(xs.shape[0], experts.hidden_size)
    hidden = xs.new_empty(xs.shape[0], experts.gate_up_proj.shape[-1 if experts.transposed else -2]) if keep_hidden \
        else xs.new_empty(0)

    inference = torch.is_inference_mode_enabled()  # thread-local like grad mode: the workers take the caller's

    def work(group: list[tuple[int, int, int]]) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            for e, s, t in group:
                x = xs[s:t]
                if not keep_hidden:  # the format's own way (a quantized expert's packed kernels, ...)
                    ys[s:t] = experts.expert(x, e)
                    continue
                h = _linear_into(hidden[s:t], x, experts.up_weight(e), _row(experts.gate_up_proj_bias, e))
                _linear_into(ys[s:t], experts.act(h), experts.down_weight(e), _row(experts.down_proj_bias, e))

    workers = torch.get_num_threads()
    list(_pool(workers).map(work, _work_groups(plan, workers, split=True)))
    return ys, hidden


def _row(bias: Tensor | None, e: int) -> Tensor | None:
    return None if bias is None else bias[e]


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out (contiguous rows) = x @ weight^T + bias, written in place (no temporary for big slices)."""
    if 2 <= x.shape[0] <= 3:
        return out.copy_(linear(x, weight, bias))
    torch.mm(x, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


def _mm_grad(g: Tensor, a: Tensor, b: Tensor, transposed: bool) -> None:
    """An expert's weight gradient a @ b ([out, in]) written into its slice g, stored as [in, out] if transposed."""
    if transposed:
        torch.mm(b.t(), a.t(), out=g)
    else:
        torch.mm(a, b, out=g)


class _ThreadedExperts(torch.autograd.Function):
    """Forward and backward of the expert FFNs on the thread pool. Saves the pre-activation [N, 2I] (what autograd
    saves for the loop path too) and recomputes the activation in backward. In backward every expert's rows stay
    on one worker, so each expert's weight gradient is written by one thread."""

    @staticmethod
    def forward(ctx, xs, plan, experts, w_up, w_down, b_up, b_down):  # noqa: ARG004 (weights: autograd inputs)
        ys, hidden = _threaded_forward(xs, plan, experts, keep_hidden=True)
        ctx.plan, ctx.experts = plan, experts
        ctx.save_for_backward(xs, hidden)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        xs, hidden = ctx.saved_tensors
        experts: ExpertsLike = ctx.experts
        grad_ys = grad_ys.contiguous()
        grad_xs = torch.empty_like(xs)
        # every expert with rows writes its whole gradient slice below; only idle experts need zeros
        grads = [None if p is None else torch.empty_like(p) for p in
                 (experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_bias, experts.down_proj_bias)]
        idle = [e for e, n in enumerate(ctx.plan.counts) if n == 0]
        for g in grads:
            if g is not None and idle:
                g[idle] = 0
        g_up, g_down, g_bup, g_bdown = grads

        def work(group: list[tuple[int, int, int]]) -> None:
            for e, s, t in group:
                gy = grad_ys[s:t]
                with torch.enable_grad():
                    h = hidden[s:t].detach().requires_grad_()
                    a = experts.act(h)
                with torch.no_grad():
                    _mm_grad(g_down[e], gy.t(), a.detach(), experts.transposed)
                    grad_a = gy @ experts.down_weight(e)
                grad_h = torch.autograd.grad(a, h, grad_a)[0]
                with torch.no_grad():
                    _mm_grad(g_up[e], grad_h.t(), xs[s:t], experts.transposed)
                    torch.mm(grad_h, experts.up_weight(e), out=grad_xs[s:t])
                    if g_bup is not None:
                        g_bup[e] = grad_h.sum(0)
                        g_bdown[e] = gy.sum(0)

        workers = torch.get_num_threads()
        list(_pool(workers).map(work, _work_groups(ctx.plan, workers, split=False)))
        return grad_xs, None, None, g_up, g_down, g_bup, g_bdown


def _aligned(t: Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned data and 16-byte multiples for every non-unit stride."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def grouped_mm_supported(xs: Tensor, experts: ExpertsLike) -> bool:
    if not hasattr(torch, "_grouped_mm") or xs.dtype not in _GROUPED_DTYPES or not hasattr(experts, "grouped_weights"):
        return False
    hidden_row_bytes = experts.intermediate_size * xs.element_size()  # the activation output's row stride
    return hidden_row_bytes % 16 == 0 and all(_aligned(t) for t in (xs, *experts.grouped_weights()))


_RUNNERS = {"loop": _run_loop, "grouped_mm": _run_grouped, "threads": _run_threads}


def choose_impl(impl: str, xs: Tensor, experts: ExpertsLike, active_experts: int) -> str:
    """`loop`: one GEMM per active expert. `grouped_mm`: every expert in one torch._grouped_mm call, where its
    dtype (float32, bfloat16) and alignment rules allow and the format gives grouped weights, else `loop`.
    `threads`: experts concurrently on a thread pool, one core each, forward and backward. `auto`: `default_impl`
    (`run_experts` measures instead, when tuning is on and no gradient is needed)."""
    if impl not in DISPATCH_IMPLS:
        raise ConfigError(f"dispatch={impl!r}: expected one of {', '.join(DISPATCH_IMPLS)}")
    if impl == "threads":
        return "threads"
    if impl == "loop" or not grouped_mm_supported(xs, experts):
        return "loop"
    if impl == "grouped_mm":
        return "grouped_mm"
    return default_impl(xs, experts, active_experts)


def default_impl(xs: Tensor, experts: ExpertsLike, active_experts: int) -> str:
    """The choice without measurement (MOEKIT_TUNE=0, or a gradient needed): threads when there is more than one
    core, at least two rows per active expert on average and enough work (64 MiB of expert weights or 4 GFLOP);
    else grouped_mm when supported and several experts get 64 rows or more in all; else loop. Thresholds measured
    on one machine (a 2-core AMD EPYC, Zen 4); other CPUs differ, hence `moekit.core.tune`."""
    if torch.get_num_threads() > 1 and xs.shape[0] >= _THREADS_MIN_ROWS * active_experts:
        weight_bytes = active_experts * experts.bytes_per_expert()
        flops = 2 * xs.shape[0] * experts.bytes_per_expert() // xs.element_size()
        if weight_bytes >= _THREADS_MIN_BYTES or flops >= _THREADS_MIN_FLOPS:
            return "threads"
    if active_experts < 2 or xs.shape[0] < 64 or not grouped_mm_supported(xs, experts):
        return "loop"
    return "grouped_mm"


def candidate_impls(xs: Tensor, experts: ExpertsLike) -> list[str]:
    """The implementations that can run these rows on these experts here."""
    names = ["loop"]
    if grouped_mm_supported(xs, experts):
        names.append("grouped_mm")
    if torch.get_num_threads() > 1:
        names.append("threads")
    return names


def shape_class(xs: Tensor, experts: ExpertsLike, active_experts: int, candidates: list[str]) -> tuple:
    """What the tuner keys a dispatch choice by (with the thread count): the experts' format, dtype, H, I, the rows
    per active expert and the active experts (each rounded up to a power of two), and the candidates."""
    per_expert = -(-xs.shape[0] // max(active_experts, 1))
    return (getattr(experts, "format", "dense"), xs.dtype, experts.hidden_size, experts.intermediate_size,
            tune.bucket(per_expert), tune.bucket(active_experts), "+".join(candidates))


def _needs_grad(xs: Tensor, experts: ExpertsLike) -> bool:
    return torch.is_grad_enabled() and (xs.requires_grad or any(
        getattr(t, "requires_grad", False) for t in (experts.gate_up_proj, experts.down_proj)))


def run_experts(xs: Tensor, plan: DispatchPlan, experts: ExpertsLike, impl: str = "auto") -> Tensor:
    """The expert FFNs on rows xs [N, H] already sorted by expert (`plan.counts[e]` rows for expert e; only
    `plan.counts` and `plan.expert` are read). Returns [N, H], unweighted, in the same order. With `impl="auto"`
    the implementation is the tuner's measured choice for this shape class (`moekit.core.tune`; forward only: a
    call that needs gradients, or MOEKIT_TUNE=0, takes `default_impl`)."""
    active = sum(1 for n in plan.counts if n)
    if impl == "auto" and tune.enabled() and not _needs_grad(xs, experts) and not torch.compiler.is_compiling():
        names = candidate_impls(xs, experts)
        name = names[0] if len(names) == 1 else tune.choose(
            "dispatch", shape_class(xs, experts, active, names),
            lambda: {n: (lambda run=_RUNNERS[n]: run(xs, plan, experts)) for n in names},
            default_impl(xs, experts, active))
    else:
        name = choose_impl(impl, xs, experts, active)
    return _RUNNERS[name](xs, plan, experts)


def sorted_plan(counts: list[int], device: torch.device | str | None = None) -> DispatchPlan:
    """A plan for rows that already come sorted by expert (expert-parallel receivers): counts[e] rows each."""
    expert = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    empty = torch.empty(0, device=device)
    return DispatchPlan(empty.long(), expert, empty, list(counts))


def dispatch(x: Tensor, plan: DispatchPlan, experts: ExpertsLike, impl: str = "auto") -> Tensor:
    """Run `experts` on x [T, H] as `plan` says; returns [T, H] in x's dtype (accumulated in float32 for
    half precisions)."""
    if plan.token.numel() == 0:
        return torch.zeros_like(x)
    xs = x.index_select(0, plan.token).to(experts.gate_up_proj.dtype)
    return combine(run_experts(xs, plan, experts, impl), plan, x)


def combine(ys: Tensor, plan: DispatchPlan, x: Tensor) -> Tensor:
    """Expert outputs ys [N, H] (in `plan`'s order) weighted and added per token: [T, H] in x's dtype,
    accumulated in float32 for half precisions."""
    acc_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    out = torch.zeros(x.shape[0], ys.shape[-1], dtype=acc_dtype, device=x.device)
    ys = ys.to(acc_dtype) * plan.weight.to(acc_dtype).unsqueeze(-1)
    return out.index_add_(0, plan.token, ys).to(x.dtype)
