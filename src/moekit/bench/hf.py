"""`moekit bench hf-accelerate`: a Qwen3-MoE-shaped model (random weights, built from config) timed for prefill
and for greedy generation, transformers' default experts path against the same model after `moekit.hf.accelerate`
(`moekit_ms`: dispatch `auto`, the ratio's denominator; `moekit_<impl>_ms`: each dispatch implementation forced),
interleaved in one process. Both contenders are the same model object, switched by `accelerate` / `restore` before
each call (the switch walks 4 layers and sets or deletes 4 attributes: microseconds against milliseconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moekit.bench.timing import interleaved
from moekit.core.dispatch import DISPATCH_IMPLS
from moekit.hf import accelerate, restore


@dataclass(frozen=True)
class HFCase:
    """The model's shape (Qwen3-MoE: 64 experts, k = 8; expert width and vocabulary shrunk to fit a CPU box) and
    the work: a `prompt`-token prefill and `new_tokens` greedy tokens after it."""

    layers: int = 4
    hidden: int = 1024
    experts: int = 64
    k: int = 8
    intermediate: int = 256
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    prompt: int = 128
    gen_prompt: int = 16
    new_tokens: int = 32


FULL = HFCase()
QUICK = HFCase(layers=2, hidden=64, experts=6, k=2, intermediate=32, heads=4, kv_heads=2, vocab=128, prompt=16,
               gen_prompt=4, new_tokens=4)


def build_model(case: HFCase) -> nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        num_hidden_layers=case.layers, hidden_size=case.hidden, num_experts=case.experts,
        num_experts_per_tok=case.k, moe_intermediate_size=case.intermediate, intermediate_size=4 * case.intermediate,
        num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, head_dim=case.hidden // case.heads,
        vocab_size=case.vocab, max_position_embeddings=4 * (case.prompt + case.new_tokens), norm_topk_prob=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.02)  # spreads the tokens over the experts as a trained router does
    return model


def _switched(model: nn.Module, impl: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run on `model` accelerated with dispatch `impl`, or as transformers runs it when impl is None."""
    def run() -> object:
        if impl is None:
            restore(model)
        else:
            accelerate(model, impl=impl)
        with torch.no_grad():
            return fn()
    return run


def bench_hf_accelerate(repeats: int = 5, quick: bool = False) -> list[dict]:
    """One record for prefill and one for generation: median ms of each contender and their ratio."""
    case = QUICK if quick else FULL
    model = build_model(case)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, case.vocab, (1, case.prompt), generator=gen)
    gen_prompt = torch.randint(3, case.vocab, (1, case.gen_prompt), generator=gen)
    gen_kw = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0)
    work = {
        "prefill": (case.prompt, lambda: model(prompt).logits),
        f"generate-{case.new_tokens}": (case.new_tokens, lambda: model.generate(gen_prompt, **gen_kw)),
    }
    shape = {"layers": case.layers, "hidden": case.hidden, "experts": case.experts, "k": case.k,
             "intermediate": case.intermediate, "vocab": case.vocab, "dtype": "float32",
             "threads": torch.get_num_threads(), "repeats": repeats,
             "transformers_experts_implementation": model.config._experts_implementation}
    records = []
    impls = {"transformers": None, "moekit": "auto"} | {f"moekit_{i}": i for i in DISPATCH_IMPLS if i != "auto"}
    for name, (tokens, fn) in work.items():
        fns = {contender: _switched(model, impl, fn) for contender, impl in impls.items()}
        outputs = {contender: f() for contender, f in fns.items()}
        ms = interleaved(fns, repeats)
        ref = outputs.pop("transformers")
        if name == "prefill":  # every moekit contender against transformers
            agree = {"max_abs_logit_diff": max(float((out - ref).abs().max()) for out in outputs.values())}
        else:
            agree = {"same_tokens": all(torch.equal(out, ref) for out in outputs.values())}
        records.append({"case": name, "tokens": tokens, **shape, **{f"{c}_ms": round(v, 3) for c, v in ms.items()},
                        "transformers_over_moekit": round(ms["transformers"] / ms["moekit"], 3), **agree})
    restore(model)
    return records
