"""Balance losses and the auxiliary-loss-free bias update. All are pure functions; nothing is collected globally.

Notation: T tokens, E experts, k slots per token, c_i = assignments to expert i (padded slots excluded),
p_{t,i} = the router's per-expert score of token t (`Routing.probs`: softmax, or normalised sigmoid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.core.routing import Routing, widen
from moekit.errors import ShapeError


def _probs(routing: Routing) -> Tensor:
    return routing.probs if routing.probs is not None else torch.softmax(widen(routing.logits), dim=-1)


def switch_balance_loss(routing: Routing) -> Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i, with f_i = c_i / T (the fraction of tokens sent
    to expert i, so with top-k the f_i sum to k, as in transformers' `load_balancing_loss_func`) and
    P_i = mean_t p_{t,i}. Its minimum under a uniform router and perfectly even load is k."""
    num_tokens, num_experts = routing.logits.shape
    if num_tokens == 0:
        return routing.logits.new_zeros((), dtype=torch.float32)
    f = routing.counts().float() / num_tokens
    p = _probs(routing).mean(dim=0)
    return num_experts * (f * p).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_t (log sum_i exp(logits_{t,i}))^2."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(widen(logits), dim=-1).square().mean()


def seq_balance_loss(routing: Routing, seq_len: int) -> Tensor:
    """DeepSeek-V2 sequence-level balance loss (`seq_aux`). Tokens are consecutive sequences of `seq_len`; per
    sequence, f_i = E / (k * S) * c_i and P_i = mean_t p_{t,i}; the loss is the mean over sequences of
    sum_i f_i P_i (1 when both are uniform)."""
    num_tokens, num_experts = routing.logits.shape
    if num_tokens == 0:
        return routing.logits.new_zeros((), dtype=torch.float32)
    if seq_len < 1 or num_tokens % seq_len:
        raise ShapeError(f"seq_len={seq_len}: expected a divisor of the token count {num_tokens}")
    num_seq = num_tokens // seq_len
    one_hot = torch.zeros(num_tokens, num_experts, device=routing.indices.device)
    one_hot.scatter_add_(1, routing.indices, routing.slot_mask().float())
    f = one_hot.view(num_seq, seq_len, num_experts).sum(1) * num_experts / (routing.k * seq_len)
    p = _probs(routing).view(num_seq, seq_len, num_experts).mean(1)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_correction_bias(bias: Tensor, counts: Tensor, gamma: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing, in place after each step: b_i += gamma * sign(mean(c) - c_i).
    Overloaded experts become less likely to be selected, underloaded ones more. Returns `bias`."""
    counts = counts.float()
    bias += gamma * torch.sign(counts.mean() - counts).to(bias)
    return bias
