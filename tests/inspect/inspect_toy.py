"""Toy language models built from moekit.MoE layers with hand-set routers, so every routing answer is known.

Token t is embedded as 10 * onehot(first[t]) (+ 5 * onehot(second[t]) for k=2) in an H = E space. Layer 0's router
is the identity, so it sends t to first[t] (and second[t]); its experts output zero unless told otherwise, so the
next layer sees the same hidden state, and layer 1's router is a permutation matrix: it sends t to perm[first[t]].
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from moekit import MoE
from moekit.data import TextDoc


class WordTokenizer:
    """Text is whitespace-separated integers, one token id each; no EOS."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):  # noqa: ARG002 (the transformers signature)
        return [int(w) for w in text.split()]


def docs_of(*seqs: list[int], domain: str | None = None) -> list[TextDoc]:
    return [TextDoc(" ".join(map(str, s)), domain, f"doc{n}") for n, s in enumerate(seqs)]


class ToyLM(nn.Module):
    def __init__(self, embed: torch.Tensor, moes: list[MoE]):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.moes = nn.ModuleList(moes)
        self.head = nn.Linear(embed.shape[1], embed.shape[0], bias=False)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        x = self.embed(ids)
        for moe in self.moes:
            x = x + moe(x).hidden
        return SimpleNamespace(logits=self.head(x))


def planted_lm(first: list[int], num_experts: int, perm: list[int] | None = None, second: list[int] | None = None,
               k: int = 1, seed: int = 0, shared: bool = False) -> ToyLM:
    """See the module docstring. Vocabulary size len(first)."""
    torch.manual_seed(seed)
    E = num_experts
    embed = 10.0 * torch.nn.functional.one_hot(torch.tensor(first), E).float()
    if second is not None:
        embed += 5.0 * torch.nn.functional.one_hot(torch.tensor(second), E).float()
    perm = perm or list(range(E))
    moes = []
    for router_weight in (torch.eye(E), torch.eye(E)[perm].t().contiguous()):
        moe = MoE(E, 8, E, k=k, router="topk", dispatch="loop", num_shared_experts=int(shared))
        with torch.no_grad():
            moe.router.weight.copy_(router_weight)
            moe.experts.down_proj.zero_()
        moes.append(moe)
    return ToyLM(embed, moes).eval()
