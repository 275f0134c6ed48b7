"""`moekit bench seeds` systems `union` (Union of Experts) and `moduleformer` on byte-level language modelling
(`seed_tasks.text_task`: the offline corpus's prose and code, 32-byte windows, vocabulary 128).

Every contender is a `ByteLM` (byte + learned position embeddings, `LAYERS` pre-norm blocks of width `HIDDEN`, a
LayerNorm and a linear head), trained by the same recipe from the same seed (Adam, lr 3e-3, batches of 16
windows), scored on the fixed test windows: cross-entropy in nats per byte and next-byte accuracy.

union: the paper claims UoE (attention heads and MLP parts as experts, routed) beats dense and MoE models at
equal compute. Contenders: a dense block of UoE's active width (2 heads of 8, MLP width 32), a plain top-2 MoE
(8 GELU experts of width 16 behind that dense attention), UoE (8 one-head attention experts with their own K/V and
8 MLP experts of width 16, top-2 of each: the equivalent decomposition of the dense block of all its weights),
and that dense block of all the weights (8 heads, MLP 128: 4x the active compute). Only UoE's expert-selection
level is measured: its data selection picks a sequence's top tokens by a score of every token, which in a causal
language model lets a position's output depend on later bytes, so every token is selected (data_fraction = 1).
A UoE part computes y_t = g_t sum_{j<k} w_tj E_{e_tj}(x_t) (g_t = sigmoid(selector . x_t), w renormalised top-k
of the softmax router, `core/union.py`). Active parameters per token: routers and selectors in full, routed
experts k / E of their weights (an attention expert's q, k, v and o projections counted as its share: moekit
computes every head's keys for every position).

moduleformer: the paper claims module addition learns new data without forgetting and the modules a task does
not use can be pruned. A `ModuleFormerBlock` LM (8 stick-breaking heads and 8 GELU experts of width 16 per block,
top-2 of each, L_MI weight 0.01) learns task A (prose). Extension: task B (code) for the same steps by
(1) fine-tuning every parameter, (2) fine-tuning the existing modules and routers only, (3) `add_modules` (4
heads and 4 experts per block) training only the new modules and their router rows; all three with the load
concentration loss L_LC = H(mean_t p_t) (weight `CONCENTRATION`; pre-training used L_MI = -H(mean_t p_t) +
mean_t H(p_t), `core/moduleformer.py`); test loss on A (forgetting) and on B. Pruning: the A model fine-tuned
on A with L_LC (half the steps), then modules with under `PRUNE_SHARE` of their block's assignments on A's
training windows pruned; against the A model fine-tuned as long with L_MI instead, pruned to the same number of
its most used modules.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.bench.seed_tasks import VOCAB, TextTask, text_task
from moekit.core.layer import LossWeights, MoE
from moekit.core.moduleformer import ModuleFormerBlock, ModuleFormerConfig, ModuleFormerOutput
from moekit.core.union import UnionOfExperts, UoEConfig

HIDDEN, LAYERS, SEQ_LEN, BATCH, LR = 64, 2, 32, 16, 3e-3
CONCENTRATION = 0.1  # L_LC weight while learning task B, and in the concentration fine-tune before pruning
PRUNE_SHARE = 0.02  # modules with under 2% of their block's assignments on task A are pruned
ADD_HEADS, ADD_EXPERTS = 4, 4


class CausalAttention(nn.Module):
    """Dense causal multi-head attention without biases: the baselines' attention."""

    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, heads, T, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def mlp(hidden: int, width: int) -> nn.Sequential:
    """down(gelu(up x)) without biases (as one of moekit's GELU experts)."""
    return nn.Sequential(nn.Linear(hidden, width, bias=False), nn.GELU(), nn.Linear(width, hidden, bias=False))


def _hidden(out: Any) -> Tensor:
    """The hidden states of a mixer's output: a tensor, a (tensor, routing) pair or an output with `.hidden`."""
    if isinstance(out, tuple):
        return out[0]
    return out if isinstance(out, Tensor) else out.hidden


class Block(nn.Module):
    """Pre-norm block: h = x + attn(norm1(x)), y = h + mlp(norm2(h))."""

    def __init__(self, hidden: int, attn: nn.Module, mlp_: nn.Module):
        super().__init__()
        self.attn, self.mlp = attn, mlp_
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = x + _hidden(self.attn(self.norm1(x)))
        return h + _hidden(self.mlp(self.norm2(h)))


class ByteLM(nn.Module):
    """ids [B, T] -> (logits [B, T, VOCAB], the blocks' summed auxiliary loss)."""

    def __init__(self, blocks: list[nn.Module], hidden: int = HIDDEN, seq_len: int = SEQ_LEN):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.pos = nn.Parameter(torch.randn(seq_len, hidden) * 0.02)
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, VOCAB)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        aux = x.new_zeros(())
        for block in self.blocks:
            out = block(x)
            if isinstance(out, ModuleFormerOutput):
                x, aux = out.hidden, aux + out.aux_loss
            else:
                x = out
        return self.head(self.norm(x)), aux

    @torch.no_grad()
    def module_usage(self, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per ModuleFormer block: (assignments per head, per feed-forward expert) on ids."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        usage = []
        for block in self.blocks:
            out = block(x)
            usage.append((out.head_routing.counts(), out.expert_routing.counts()))
            x = out.hidden
        return usage


def train_lm(model: ByteLM, task: TextTask, steps: int, seed: int, params: list[nn.Parameter] | None = None) -> None:
    """CE on next bytes + the blocks' auxiliary loss; Adam on `params` (default: all)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(model.parameters()) if params is None else params, lr=LR)
    for _ in range(steps):
        w = task.batch(BATCH, g)
        logits, aux = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1)) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(model: ByteLM, task: TextTask) -> tuple[float, float]:
    """(test cross-entropy in nats per byte, next-byte accuracy)."""
    logits, _ = model(task.test[:, :-1])
    target = task.test[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    return float(loss), float((logits.argmax(-1) == target).float().mean())


def _count(params) -> int:
    return sum(p.numel() for p in params)


def active_parameters(model: ByteLM) -> tuple[float, int]:
    """(parameters a token uses, all parameters) of the blocks' attention and MLP parts (norms excluded)."""
    active, total = 0.0, 0
    for block in model.blocks:
        for part in (block.attn, block.mlp):
            if isinstance(part, UnionOfExperts):
                experts = [p for n, p in part.experts.named_parameters() if not n.startswith("router.")]
                fixed, share = _count([*part.selector.parameters(), *part.router.parameters()]), \
                    part.config.k / part.config.num_experts
            elif isinstance(part, MoE):
                experts, fixed, share = list(part.experts.parameters()), _count(part.router.parameters()), \
                    part.k / part.num_experts
            else:
                experts, fixed, share = [], _count(part.parameters()), 0.0
            active += fixed + share * _count(experts)
            total += fixed + _count(experts)
    return active, total


def union_builders() -> dict[str, Any]:
    """The union contenders (module docstring): name -> a function building the ByteLM."""
    h, none = HIDDEN, LossWeights(balance=0.0, z=0.0, seq=0.0)
    blocks = {
        "dense, uoe's active width (2 heads x 8, MLP 32)": lambda: Block(h, CausalAttention(h, 2, 8), mlp(h, 32)),
        "top-2 MoE (8 experts x 16) + that dense attention": lambda: Block(
            h, CausalAttention(h, 2, 8), MoE(h, 16, 8, 2, activation="gelu", loss_weights=none)),
        "uoe: 8 head experts + 8 MLP experts, top-2 each": lambda: Block(
            h, UnionOfExperts(UoEConfig(h, 8, 2, kind="attention", data_fraction=1.0)),
            UnionOfExperts(UoEConfig(h, 8, 2, kind="mlp", intermediate_size=128, data_fraction=1.0))),
        "dense, all of uoe's weights (8 heads x 8, MLP 128)": lambda: Block(h, CausalAttention(h, 8, 8),
                                                                            mlp(h, 128)),
    }
    return {name: (lambda b=block: ByteLM([b() for _ in range(LAYERS)])) for name, block in blocks.items()}


def run_union(steps: int, seed: int) -> list[dict[str, Any]]:
    task = text_task("prose")
    out = []
    for name, build in union_builders().items():
        torch.manual_seed(seed)
        model = build()
        train_lm(model, task, steps, seed)
        loss, acc = evaluate(model, task)
        active, total = active_parameters(model)
        out.append({"contender": name, "test_loss": loss, "accuracy": acc, "active_params": active,
                    "active_share": active / total})
    return out


def moduleformer_lm() -> ByteLM:
    cfg = dict(num_heads=8, head_k=2, head_dim=8, num_experts=8, expert_k=2, expert_size=16, mi_weight=0.01)
    return ByteLM([ModuleFormerBlock(ModuleFormerConfig(HIDDEN, **cfg)) for _ in range(LAYERS)])


def set_losses(model: ByteLM, mi: float, concentration: float) -> None:
    for block in model.blocks:
        block.config.mi_weight, block.config.concentration_weight = mi, concentration


def add_module_params(model: ByteLM, heads: int, experts: int) -> list[nn.Parameter]:
    """`add_modules(heads, experts)` in every block; returns the parameters that hold the new modules (query /
    output projections, experts, router rows), whose old rows get zero gradients (a hook), so with Adam and no
    weight decay only the new modules and their router rows change. Every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for block in model.blocks:
        old_heads, old_experts = block.attn.num_heads, block.ffn.num_experts
        block.add_modules(heads=heads, experts=experts)
        for p, old in ((block.attn.q_proj, old_heads), (block.attn.o_proj, old_heads),
                       (block.attn.router.weight, old_heads), (block.ffn.experts.gate_up_proj, old_experts),
                       (block.ffn.experts.down_proj, old_experts), (block.ffn.router.weight, old_experts)):
            p.requires_grad_(True)
            p.register_hook(lambda grad, n=old: torch.cat([torch.zeros_like(grad[:n]), grad[n:]]))
            params.append(p)
    return params


def module_params(model: ByteLM) -> list[nn.Parameter]:
    """The modules and routers of every block (attention experts with the shared K/V, feed-forward experts);
    every other parameter is frozen."""
    params = [p for block in model.blocks for p in (*block.attn.parameters(), *block.ffn.parameters())]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def modules(model: ByteLM) -> int:
    return sum(b.attn.num_heads + b.ffn.num_experts for b in model.blocks)


def prune_by_usage(model: ByteLM, ids: Tensor, min_share: float = 0.0,
                   keep: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Per block, keep the modules with over `min_share` of the block's assignments on ids (at least k), or the
    `keep[b]` = (heads, experts) most used; returns the (heads, experts) kept per block."""
    kept = []
    for b, (block, (heads, experts)) in enumerate(zip(model.blocks, model.module_usage(ids), strict=True)):
        chosen = []
        for i, (counts, k) in enumerate(((heads, block.config.head_k), (experts, block.config.expert_k))):
            order = torch.argsort(counts, descending=True, stable=True)
            n = keep[b][i] if keep is not None else \
                max(k, int((counts.float() / counts.sum() > min_share).sum()))
            chosen.append(sorted(order[:n].tolist()))
        block.prune_modules(*chosen)
        kept.append((len(chosen[0]), len(chosen[1])))
    return kept


def run_moduleformer(steps: int, seed: int) -> list[dict[str, Any]]:
    task_a, task_b = text_task("prose"), text_task("code")
    torch.manual_seed(seed)
    base = moduleformer_lm()
    train_lm(base, task_a, steps, seed)
    set_losses(base, 0.0, CONCENTRATION)

    def row(name: str, model: ByteLM) -> dict[str, Any]:
        return {"contender": name, "loss_a": evaluate(model, task_a)[0], "loss_b": evaluate(model, task_b)[0],
                "modules": modules(model)}

    out = [row("after task A (prose), L_MI", base)]
    extensions = {
        "B (code): fine-tune all parameters": lambda _: None,
        "B: fine-tune the modules and routers only": module_params,
        f"B: add {ADD_HEADS} heads + {ADD_EXPERTS} experts per block, train only them":
            lambda m: add_module_params(m, ADD_HEADS, ADD_EXPERTS),
    }
    for name, params_of in extensions.items():
        model = copy.deepcopy(base)
        train_lm(model, task_b, steps, seed + 1, params_of(model))
        out.append(row(name, model))
    ids = task_a.batch(64, torch.Generator().manual_seed(seed + 2))[:, :-1]  # A's training windows
    more = max(1, steps // 2)
    control, concentrated = copy.deepcopy(base), copy.deepcopy(base)
    set_losses(control, 0.01, 0.0)
    train_lm(control, task_a, more, seed + 3)
    train_lm(concentrated, task_a, more, seed + 3)
    out.append(row("A: more steps on A with L_MI", control))
    out.append(row("A: more steps on A with L_LC", concentrated))
    kept = prune_by_usage(concentrated, ids, PRUNE_SHARE)
    prune_by_usage(control, ids, keep=kept)
    out.append(row("A with L_MI, pruned to as many of its most used modules", control))
    out.append(row(f"A with L_LC, modules under {PRUNE_SHARE:.0%} of A's assignments pruned", concentrated))
    return out
