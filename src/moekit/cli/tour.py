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
    _bridge_step()
    return 0


def _bridge_step() -> None:
    """A small random Qwen3-MoE built from its config (no download) run by transformers, then through moekit."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import moekit.hf as mh

    print("\n4. The Hugging Face bridge: a small random Qwen3-MoE (2 layers, 8 experts, top-2), built from its config")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, vocab_size=512, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    for block in mh.view(model):
        print(f"   layer {block.layer}: {block.num_experts} experts, k={block.k}, "
              f"gate_up_proj {tuple(block.experts.gate_up_proj.shape)} (the model's own tensor, not a copy)")
    ids = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.accelerate(model)
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        mh.restore(model)
    print(f"   after moekit.hf.accelerate: max |logit difference| {float((logits - ref_logits).abs().max()):.2e}, "
          f"greedy tokens identical: {torch.equal(tokens, ref_tokens)}; moekit.hf.restore puts transformers' path back")
