"""`moekit make MODEL --method P --experts E --k K [--router R] [--shared S] [--layers L,...] [--data FILE] --out DIR`
`moekit make finetune MODEL (--steps N | --minutes M) [--data FILE] --out DIR` (continued training) and
`moekit make distill MODEL --teacher DENSE [--steps N] [--data FILE] --out DIR` (m2mKD module distillation) and
`moekit make distill MODEL --teachers DIR DIR ... --data FILE ... [--pace progress|easiest] --out DIR` (specialists
distilled into one student, self-paced per teacher)."""

from __future__ import annotations

import argparse
import json

HELP = ("turn a dense decoder (Qwen3, Qwen2, Llama, Mistral, dense DeepSeek-V3) into a native MoE (Qwen3-MoE, "
        "Qwen2-MoE, Mixtral, DeepSeek-V3), or a BERT encoder into a trust_remote_code one, by splitting its FFNs; "
        "`make finetune MODEL` continues training one; `make distill MODEL --teacher DENSE` fits its MoE blocks "
        "to the dense FFNs, `make distill MODEL --teachers DIR DIR ...` distils specialists into it")


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.make import PARTITIONS, ROUTERS, UPCYCLE_ROUTERS

    p.add_argument("model", metavar="[finetune|distill] MODEL", nargs="+",
                   help="a checkpoint directory (config.json + safetensors); `finetune MODEL` trains MODEL further; "
                        "`distill MODEL` distils its MoE blocks from --teacher")
    p.add_argument("--method", choices=(*PARTITIONS, "upcycle", "btx", "bam", "mote"),
                   default="kmeans",
                   help="how neurons are grouped into experts; upcycle: every expert a copy; btx: one branch per "
                        "--data domain trained --steps / --minutes, their FFNs the experts; bam: btx whose attention "
                        "is also a soft mixture of the branches' attentions (saved for trust_remote_code); mote: "
                        "the FFN a full-precision shared expert, --experts ternary routed copies (--k default 1), "
                        "trained by `make finetune` (default kmeans)")
    p.add_argument("--mote-init", choices=("copy", "zero"), default="copy",
                   help="mote: routed experts start as ternary copies of the FFN (copy, the paper's) or with zero "
                        "down projections, so the model starts as the dense one (zero)")
    p.add_argument("--share-kv", action="store_true", help="bam: the attention experts share one key/value "
                   "projection (the branches' average)")
    p.add_argument("--group-size", type=int, default=64, help="mote: inputs per ternary scale (default 64)")
    p.add_argument("--router", choices=tuple(dict.fromkeys((*ROUTERS, *UPCYCLE_ROUTERS))),
                   help=f"split experts: {', '.join(ROUTERS)} (default centroid); upcycle: "
                        f"{', '.join(UPCYCLE_ROUTERS)} (default random); btx: hidden (default) or random")
    p.add_argument("--experts", type=int, help="experts per FFN (converting: required; btx: the domains)")
    p.add_argument("--k", type=int, help="experts per token (converting: required)")
    p.add_argument("--shared", type=int, help="shared experts of the routed width (default: 1 for Qwen2 and "
                   "DeepSeek-V3, whose MoE families have one; 0 otherwise); split experts: I / (E + shared) wide")
    p.add_argument("--layers", help="comma-separated layer indices to convert (default: all)")
    p.add_argument("--data", action="append", metavar="FILE", help="calibration / training text (.jsonl or text; "
                   "repeatable); finetune without it trains on moekit's training corpus")
    p.add_argument("--pregate", action="store_true", help="also fit Read-ME's pre-gating router (every layer's "
                   "experts from the token ids) on --data and save it beside the model")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", metavar="DENSE", help="distill: the dense checkpoint MODEL was made from")
    p.add_argument("--teachers", nargs="+", metavar="DIR", help="distill: specialist checkpoints distilled into MODEL "
                   "together (Knowledge Concentration / DOPE), teacher d on the d-th --data domain, --steps in all")
    p.add_argument("--pace", choices=("progress", "easiest"), default="progress",
                   help="distill --teachers: self-paced weights that follow the student's progress on each teacher "
                        "(default) or easiest teachers first")
    ft = p.add_argument_group("finetune")
    ft.add_argument("--steps", type=int, help="finetune (and each btx branch, default 50): optimiser steps (with "
                    "--minutes, whichever ends first); distill: steps per MoE layer (default 200)")
    ft.add_argument("--minutes", type=float, help="finetune / each btx branch: wall-clock budget in minutes")
    ft.add_argument("--lr", type=float, help="finetune / btx: peak learning rate after warmup (default 1e-4, safe for "
                    "converged checkpoints); distill: Adam's learning rate (default 1e-3; --teachers 3e-4)")
    ft.add_argument("--warmup", type=int, help="finetune / btx: linear warmup steps (default 10%% of the planned "
                    "steps; with --minutes the plan comes from the first 5 steps' speed)")
    ft.add_argument("--decay", choices=("cosine", "linear", "none"), default="cosine",
                    help="finetune / btx: after the warmup, down to 10%% of --lr at the last planned step (default "
                         "cosine; none: constant)")
    ft.add_argument("--batch-size", type=int, default=8, help="finetune: sequences per step (default 8)")
    ft.add_argument("--seq-len", type=int, default=256, help="finetune: tokens per sequence (default 256)")
    ft.add_argument("--bias-update-rate", type=float,
                    help="finetune: DeepSeek-V3 balancing bias step per step (default: 1e-3 capped at a tenth of the "
                         "router scores' spread, which keeps a MoEfied model's choice; 0: off)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _finetune(args: argparse.Namespace, model: str) -> dict:
    from moekit.make.finetune import Finetune, finetune_checkpoint

    settings = Finetune(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, warmup=args.warmup,
                        decay=args.decay, seq_len=args.seq_len, bias_update_rate=args.bias_update_rate,
                        **({} if args.lr is None else {"lr": args.lr}),
                        seed=args.seed)
    return finetune_checkpoint(model, args.out, settings, args.data, args.force)


def _distill_teachers(args: argparse.Namespace, model: str) -> int:
    from moekit.errors import ConfigError
    from moekit.make.distill import distill_teachers_checkpoint
    from moekit.make.finetune import Finetune

    if args.teacher:
        raise ConfigError("make distill: --teacher and --teachers; expected one of them")
    settings = Finetune(steps=100 if args.steps is None else args.steps, minutes=args.minutes,
                        lr=3e-4 if args.lr is None else args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                        seed=args.seed)
    summary = distill_teachers_checkpoint(model, args.teachers, args.out, settings, args.data, args.pace,
                                          force=args.force)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        losses = ", ".join(f"{d} {a:.3g} -> {b:.3g}" for d, a, b in
                           zip(summary["domains"], summary["first_losses"], summary["last_losses"], strict=True))
        print(f"distilled {len(summary['teachers'])} teachers into {summary['model_type']} ({summary['steps']} "
              f"steps, pace {summary['pace']}): KL to each teacher {losses}; written to {summary['out']}")
    return 0


def _distill(args: argparse.Namespace, model: str) -> int:
    from moekit.errors import ConfigError
    from moekit.make.distill import distill_checkpoint

    if args.teachers:
        return _distill_teachers(args, model)
    if not args.teacher:
        raise ConfigError("make distill: --teacher missing; expected the dense checkpoint MODEL was made from "
                          "(or --teachers DIR DIR ... for specialists)")
    if args.minutes is not None:
        raise ConfigError("make distill: --minutes is not supported; expected --steps N (per MoE layer)")
    summary = distill_checkpoint(model, args.teacher, args.out, 200 if args.steps is None else args.steps,
                                 args.data, lr=1e-3 if args.lr is None else args.lr, seq_len=args.seq_len,
                                 max_tokens=args.max_tokens, seed=args.seed, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        errors = ", ".join(f"layer {r['layer']} {r['mse_before']:.3g} -> {r['mse_after']:.3g}"
                           for r in summary["layers"])
        print(f"distilled {summary['model_type']} from {summary['teacher']} ({summary['steps']} steps per layer, "
              f"{summary['seconds']} s): held-out block MSE {errors}; written to {summary['out']}")
    return 0


def _layers(text: str | None) -> list[int] | None:
    from moekit.errors import ConfigError

    try:
        return [int(x) for x in text.split(",")] if text else None
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated integers") from None


def run(args: argparse.Namespace) -> int:
    from moekit.errors import ConfigError
    from moekit.make.run import make_checkpoint

    if len(args.model) == 2 and args.model[0] == "distill":
        return _distill(args, args.model[1])
    if len(args.model) == 2 and args.model[0] == "finetune":
        summary = _finetune(args, args.model[1])
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print(f"finetuned {summary['model_type']} for {summary['steps']} steps ({summary['seconds']} s): loss "
                  f"{summary['first_loss']} -> {summary['last_loss']}; written to {summary['out']}")
        return 0
    if len(args.model) != 1:
        raise ConfigError(f"MODEL {' '.join(args.model)!r}: expected one checkpoint directory, or `finetune MODEL` / "
                          "`distill MODEL`")
    if args.method == "mote":
        from moekit.make.mote import mote_checkpoint

        if args.experts is None:
            raise ConfigError("--experts: required to convert a model; expected an integer")
        layers = _layers(args.layers)
        summary = mote_checkpoint(args.model[0], args.out, args.experts, 1 if args.k is None else args.k,
                                  args.mote_init, args.group_size, layers, args.seed, args.force)
        print(json.dumps(summary, indent=1) if args.json else
              f"{summary['source_type']} -> {summary['target_type']} (MoTE): {summary['experts']} ternary experts, "
              f"k={summary['k']}, init {summary['mote_init']}, layers {summary['layers']}; written to {summary['out']}")
        return 0
    for flag in ("k",) if args.method in ("btx", "bam") else ("experts", "k"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag}: required to convert a model; expected an integer")
    layers = _layers(args.layers)
    router = args.router or {"upcycle": "random", "btx": "hidden", "bam": "hidden"}.get(args.method, "centroid")
    branch = None
    if args.method in ("btx", "bam"):
        from moekit.make.finetune import Finetune

        branch = Finetune(steps=args.steps if args.steps is not None or args.minutes else 50, minutes=args.minutes,
                          batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, warmup=args.warmup,
                          decay=args.decay, **({} if args.lr is None else {"lr": args.lr}))
        branch.check()
    summary = make_checkpoint(args.model[0], args.out, args.experts, args.k, args.method, router, layers,
                              args.data, args.max_tokens, args.seed, args.force, shared=args.shared, branch=branch,
                              pregate=args.pregate, share_kv=args.share_kv)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['source_type']} -> {summary['target_type']}: {summary['experts']} experts, k={summary['k']}, "
              f"partition {summary['partition']}, router {summary['router']}, layers {summary['layers']}; "
              f"written to {summary['out']}")
    return 0
