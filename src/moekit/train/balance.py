"""Expert load of a native transformers MoE model during training, and what balances it.

`LoadRecorder` counts, per MoE layer, the assignments each expert receives: a forward pre-hook on every experts
module reads the `top_k_index` the family's own router chose (every transformers v5 family calls
`experts(hidden, top_k_index, top_k_weights)`), so the counts are the real selections, correction bias and group
limits included. From them:
- `load_stats`: per layer the load CV, the least and most loaded expert as a multiple of the uniform share, and the
  experts that received nothing (dead);
- DeepSeek-V3's auxiliary-loss-free balancing: after each optimiser step the router's `e_score_correction_bias`
  moves by gamma * sign(mean load - load_i) (`moekit.core.losses.update_correction_bias`);
- DeepSeek-V3's complementary sequence-wise balance loss (optional): per sequence of S tokens,
  f_i = E / (k S) * (tokens of the sequence that chose i), P_i = mean_t s'_{t,i} with s' the router's scores
  normalised to sum 1 per token (sigmoid scores for sigmoid routers, softmax otherwise); loss = mean over
  sequences of sum_i f_i P_i (`moekit.core.losses.seq_balance_loss`), 1 when both are uniform.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.core.losses import seq_balance_loss, update_correction_bias
from moekit.core.routing import Routing
from moekit.errors import ConfigError


def _top_k_index(args: tuple, kwargs: dict) -> Tensor:
    return args[1] if len(args) > 1 else kwargs["top_k_index"]


class LoadRecorder:
    """Per-layer expert counts of the forwards since the last `reset()`; with `keep_routing=True` also each
    layer's router logits and selections of the last forward (for the sequence-wise loss)."""

    def __init__(self, model: nn.Module, keep_routing: bool = False):
        from moekit.hf.view import view

        self.blocks = view(model)
        self.counts: list[Tensor] = [torch.zeros(b.experts.num_experts, dtype=torch.float64) for b in self.blocks]
        self.last: list[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)
        self._logits: list[Tensor | None] = [None] * len(self.blocks)
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.experts.module.register_forward_pre_hook(self._counter(i), with_kwargs=True))
            if keep_routing:
                self._handles.append(block.router.register_forward_hook(self._logit_keeper(i)))

    def _counter(self, i: int):
        def hook(_module, args, kwargs):
            idx = _top_k_index(args, kwargs).detach()
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=self.counts[i].numel()).to(torch.float64)
            if self._logits[i] is not None:
                self.last[i] = (self._logits[i], idx)
        return hook

    def _logit_keeper(self, i: int):
        def hook(_module, _args, output):
            self._logits[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def load_stats(counts: list[Tensor]) -> dict[str, list[float]]:
    """Per layer: load_cv (std / mean of the counts), load_min / load_max (least / most loaded expert over the
    uniform share) and dead (experts with no assignment)."""
    stats: dict[str, list[float]] = {"load_cv": [], "load_min": [], "load_max": [], "dead": []}
    for c in counts:
        mean = c.mean().clamp_min(1e-12)
        stats["load_cv"].append(float(c.std(unbiased=False) / mean))
        stats["load_min"].append(float(c.min() / mean))
        stats["load_max"].append(float(c.max() / mean))
        stats["dead"].append(int((c == 0).sum()))
    return stats


def correction_biases(model: nn.Module) -> list[Tensor]:
    """Every MoE layer's `e_score_correction_bias` (DeepSeek-V3's selection bias); ConfigError naming the family
    when a layer's router has none."""
    from moekit.hf.view import view

    biases = []
    for block in view(model):
        bias = getattr(block.router, "e_score_correction_bias", None)
        if not isinstance(bias, Tensor):
            raise ConfigError(f"bias_update_rate: {type(block.router).__name__} (layer {block.layer}) has no "
                              "e_score_correction_bias; expected a family that selects with a correction bias "
                              "(deepseek_v3)")
        biases.append(bias)
    return biases


def update_biases(biases: list[Tensor], counts: list[Tensor], rate: float) -> list[float]:
    """DeepSeek-V3's sign rule on each layer's batch load; returns each layer's bias spread (max - min)."""
    spread = []
    for bias, c in zip(biases, counts, strict=True):
        update_correction_bias(bias, c, rate)
        spread.append(float(bias.max() - bias.min()))
    return spread


def sequence_balance_loss(recorder: LoadRecorder, seq_len: int, sigmoid: bool) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss of the last forward, averaged over the MoE layers."""
    losses = []
    for entry in recorder.last:
        if entry is None:
            raise ConfigError("seq_balance_coef: the router's scores were not recorded; expected a LoadRecorder "
                              "made with keep_routing=True before the forward")
        logits, idx = entry
        logits = logits.float()
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        routing = Routing(logits, torch.ones(idx.shape, dtype=probs.dtype), idx, probs=probs)
        losses.append(seq_balance_loss(routing, seq_len))
    return torch.stack(losses).mean()
