"""`moekit lora train MODEL --domain D --out DIR` (one PEFT LoRA per domain) and
`moekit lora mix MODEL --adapters DIR... --router R --out DIR` (a LoRA-MoE over saved adapters, routers trained).

Other subcommands join the group from their own module (compose B: `moekit lora merge` in moekit.cli.lora_merge):
a module named in SUBCOMMAND_MODULES defines HELP, add_parser(p) and run(args), and is registered when present;
`register(name, help, add_parser, run)` does the same from code.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable

HELP = "LoRA experts: train one PEFT LoRA per domain (train), route among saved LoRAs (mix)"

SUBCOMMAND_MODULES = {"merge": "moekit.cli.lora_merge"}
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]
_SUBCOMMANDS = {}


def register(name: str, help: str, add_parser: Callable[[argparse.ArgumentParser], None],  # noqa: A002
             run: Callable[[argparse.Namespace], int | None]) -> None:
    """Add `moekit lora NAME` (call before the parser is built)."""
    _SUBCOMMANDS[name] = (help, add_parser, run)


def _model(path: str | None) -> str:
    from moekit.default import default_model_path

    return path if path is not None else str(default_model_path())


def _add_train(p: argparse.ArgumentParser) -> None:
    from moekit.compose.domains import DOMAINS

    p.add_argument("model", metavar="MODEL", nargs="?", help="base checkpoint directory with tokenizer.json "
                   "(default: the default model; its dense twin is moekit.default.default_dense_model_path())")
    p.add_argument("--domain", required=True, help=f"one of {', '.join(DOMAINS)}")
    p.add_argument("--out", required=True, help="adapter directory to write (loads with PeftModel.from_pretrained)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--targets", help="comma-separated module names (default: the attention projections)")
    p.add_argument("--expert-params", action="store_true",
                   help="also LoRA on the fused 3D expert parameters of an MoE (PEFT target_parameters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_train(args: argparse.Namespace) -> int:
    from moekit.compose.lora import train_domain_lora

    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    summary = train_domain_lora(_model(args.model), args.domain, args.out, args.steps, rank=args.rank, alpha=args.alpha,
                                lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, target_modules=targets,
                                expert_params=args.expert_params, seed=args.seed, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"lora {summary['domain']}: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> "
              f"{summary['last_loss']:.3f}, valid ppl {summary['valid_ppl_before']} -> {summary['valid_ppl_after']};"
              f" written to {summary['out']}")
    return 0


def _add_mix(p: argparse.ArgumentParser) -> None:
    from moekit.compose.lora_moe import KINDS
    from moekit.compose.rules import RULES

    p.add_argument("model", metavar="MODEL", nargs="?", help="base checkpoint directory the adapters were trained "
                   "on (default: the default model)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="DIR", help="PEFT LoRA adapter directories, one "
                   "expert each (same rank and target modules)")
    p.add_argument("--router", default="topk", help=f"routing rule: {', '.join(RULES)} (default topk)")
    p.add_argument("--kind", default="moe", help=f"layer: {', '.join(KINDS)} (default moe)")
    p.add_argument("--k", type=int, help="topk / mixer: experts per token (default min(2, pool))")
    p.add_argument("--top-p", type=float, default=0.75, help="dynmole: mass kept by top-p (default 0.75)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="dynmole: soft routing above this share of the uniform's Tsallis entropy (default 0.9)")
    p.add_argument("--q", type=float, default=1.1, help="dynmole: Tsallis index (default 1.1)")
    p.add_argument("--budget", type=int, help="mora: rank-1 experts per token (default: one adapter's rank)")
    p.add_argument("--seq-rank", type=int, default=4, help="hydra: rank of the sequential branch (default 4)")
    p.add_argument("--modules", help="comma-separated leaf names of the adapted layers to mix (default: all), e.g. "
                   "q_proj,k_proj,v_proj,o_proj for LoRA-Mixer's attention input/output projections")
    p.add_argument("--domains", help="comma-separated training domains, one per adapter in order (the domain "
                   "of adapter i is expert i's label); without it the routers are not trained")
    p.add_argument("--steps", type=int, default=100, help="router training steps (default 100; 0: none)")
    p.add_argument("--train-experts", action="store_true", help="train the LoRA experts too (default: frozen)")
    p.add_argument("--aux-weight", type=float, default=0.01, help="weight of the rules' aux losses (default 0.01)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="mixture directory to write (mixture.json, mixture.safetensors)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_mix(args: argparse.Namespace) -> int:
    from moekit.compose.mixing import mix_checkpoint

    options = {"top_p": args.top_p, "threshold": args.threshold, "q": args.q}
    if args.k is not None:
        options["k"] = args.k
    if args.kind == "mora" and args.budget is not None:
        options["budget"] = args.budget
    if args.kind == "hydra":
        options["seq_rank"] = args.seq_rank
    domains = [d for d in args.domains.split(",") if d] if args.domains else None
    if args.modules:
        options["modules"] = [m for m in args.modules.split(",") if m]
    summary = mix_checkpoint(_model(args.model), args.adapters, args.out, router=args.router, kind=args.kind,
                             domains=domains, steps=args.steps, train_experts=args.train_experts,
                             aux_weight=args.aux_weight, lr=args.lr, batch_size=args.batch_size,
                             seq_len=args.seq_len, seed=args.seed, force=args.force, **options)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        acc = summary.get("routing_accuracy")
        print(f"lora mix ({summary['kind']}, {summary['router']}) over {len(summary['adapters'])} adapters"
              f"{'' if acc is None else f', routing accuracy {acc:.3f}'}; written to {summary['out']}")
    return 0


def _subcommands() -> dict:
    subs = {"train": ("train one PEFT LoRA on a domain of moekit.compose.domains", _add_train, _run_train),
            "mix": ("a LoRA-MoE over saved PEFT LoRA adapters (MixLoRA top-k, DynMoLE, LoRA-Mixer, MoRA, Hydra)",
                    _add_mix, _run_mix)}
    for name, module_name in SUBCOMMAND_MODULES.items():
        if name in _SUBCOMMANDS:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        register(name, module.HELP, module.add_parser, module.run)
    return {**subs, **_SUBCOMMANDS}


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    for name, (text, add, _) in _subcommands().items():
        add(sub.add_parser(name, help=text, description=text))


def run(args: argparse.Namespace) -> int:
    return _subcommands()[args.lora_command][2](args) or 0
