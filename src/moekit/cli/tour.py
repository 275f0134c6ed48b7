"""`moekit tour`: a short walk through what moekit does, on a small random MoE (the default trained model comes
with a later release of the tour)."""

from __future__ import annotations

import argparse

import torch

from moekit.bench.layer import CASES, run_case
from moekit.cli.bench import format_table
from moekit.core.layer import MoE

HELP = "a quick tour: build an MoE layer, route tokens, benchmark the dispatch path"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per benchmark contender (default 5)")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    print("1. An MoE layer: 8 SwiGLU experts, top-2 softmax routing, one shared expert")
    moe = MoE(hidden_size=256, intermediate_size=512, num_experts=8, k=2, num_shared_experts=1)
    print(moe)
    x = torch.randn(4, 128, 256)
    out = moe(x)
    print(f"\n2. Routed {out.routing.num_tokens} tokens: output {tuple(out.hidden.shape)}, "
          f"aux loss {out.aux_loss.item():.4f} ({', '.join(f'{k}={v.item():.3f}' for k, v in out.losses.items())})")
    counts = out.expert_counts.tolist()
    print("   tokens per expert:", counts, f"(balance max/mean = {max(counts) / (sum(counts) / len(counts)):.2f})")
    capped = MoE(256, 512, 8, k=2, capacity_factor=0.5)
    capped.load_state_dict(moe.state_dict(), strict=False)
    print(f"   with capacity factor 0.5: {capped(x).dropped} of {2 * out.routing.num_tokens} assignments dropped")
    print("\n3. The dispatch path against transformers' Mixtral/DeepSeek blocks and a dense FFN of equal active "
          "FLOPs (shapes 1/4 of `moekit bench layer`, medians of interleaved runs):")
    records = []
    for case in CASES:
        records.extend(run_case(case.scaled(4), args.repeats))
    print(format_table(records))
    print("\nFull benchmark: `moekit bench layer --json` (or `make bench`).")
    return 0
