"""`moekit bench layer [--json] [--case NAME ...] [--dtype fp32|bf16 ...] [--repeats N] [--quick]`,
`moekit bench tune [MODEL] [--json] [--dtype fp32|bf16 ...] [--quick]`,
`moekit bench hf-accelerate [--json] [--repeats N] [--quick]`, `moekit bench train [--json] [--repeats N] [--quick]`,
`moekit bench routers [--json] [--router NAME ...] [--steps N] [--quick]`,
`moekit bench compress [MODEL] [--data FILE] [--json] [--quick]`,
`moekit bench drift [--json] [--quick] [--length N] [--stream NAME ...] [--model NAME ...] [--seed N]`,
`moekit bench decode [MODEL] [--json] [--quick] [--large] [--repeats N] [--threads N ...] [--dtype D ...]`,
`moekit bench serve [--json] [--clients N] [--seconds S] [--quick]`,
`moekit bench compose [--json] [--model PATH] [--adapters DIR] [--quick]`."""

from __future__ import annotations

import argparse
import json
import sys

from moekit.bench.hf import bench_hf_accelerate
from moekit.bench.layer import CASES, bench_layer
from moekit.errors import ConfigError

HELP = "benchmarks (interleaved runs, medians, baselines measured in the same run)"
HF_COLUMNS = ["case", "tokens", "transformers_ms", "moekit_ms", "transformers_over_moekit", "moekit_loop_ms",
              "moekit_grouped_mm_ms", "moekit_threads_ms"]


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    layer = sub.add_parser("layer", help="the MoE layer against transformers' blocks and a dense FFN")
    layer.add_argument("--json", action="store_true", help="print the records as a JSON list")
    layer.add_argument("--case", action="append", choices=[c.name for c in CASES], help="run only this case")
    layer.add_argument("--repeats", type=int, default=10, help="timed rounds per contender (median; default 10)")
    layer.add_argument("--quick", action="store_true", help="shapes shrunk 16x: a smoke run, not a measurement")
    layer.add_argument("--dtype", action="append", help="fp32 or bf16 (repeatable; default: both)")
    tu = sub.add_parser("tune", help="fill the dispatch autotuner's cache for a model's expert shapes; print choices")
    tu.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    tu.add_argument("--json", action="store_true", help="print the records as a JSON list")
    tu.add_argument("--dtype", action="append", help="fp32 or bf16 (repeatable; default: both)")
    tu.add_argument("--quick", action="store_true", help="token counts 1, 4 and 64 only")
    hf = sub.add_parser("hf-accelerate", help="a Qwen3-MoE-shaped model: transformers' default vs moekit.hf.accelerate")
    hf.add_argument("--json", action="store_true", help="print the records as a JSON list")
    hf.add_argument("--repeats", type=int, default=5, help="timed rounds per contender (median; default 5)")
    hf.add_argument("--quick", action="store_true", help="a tiny model: a smoke run, not a measurement")
    tr = sub.add_parser("train", help="training-step throughput: moekit vs transformers blocks; EP 2 ranks vs 1")
    tr.add_argument("--json", action="store_true", help="print the records as a JSON list")
    tr.add_argument("--repeats", type=int, default=5, help="timed rounds per contender (median; default 5)")
    tr.add_argument("--quick", action="store_true", help="one round of small batches: a smoke run")
    tr.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: also time the step under bf16 autocast, against fp32 in the same run")
    ro = sub.add_parser("routers", help="every research router trained by one shortened tiny recipe, compared")
    ro.add_argument("--json", action="store_true", help="print the records as a JSON list")
    ro.add_argument("--router", action="append", help="run only this router (repeatable; default: all)")
    ro.add_argument("--steps", type=int, default=300, help="training steps per router (default 300)")
    ro.add_argument("--quick", action="store_true", help="the smoke recipe: a smoke run, not a measurement")
    ro.add_argument("--seed", type=int, default=0,
                    help="the recipe's seed: initialisation and batch order; the corpus split stays seed 0's "
                         "(default 0)")
    ro.add_argument("--inference", action="store_true",
                    help="instead: moekit-tiny under inference-time changes (k, top-p, skipping, SCMoE)")
    co = sub.add_parser("compress", help="every compression method at 25%%/50%% and the quantizations: held-out "
                        "perplexity ratio and bytes, frequency pruning the baseline")
    co.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    co.add_argument("--data", action="append", help="text to split into calibration and held-out halves")
    co.add_argument("--json", action="store_true", help="print the records as a JSON list")
    co.add_argument("--quick", action="store_true", help="256 calibration and evaluation tokens: a smoke run")
    co.add_argument("--speed", action="store_true",
                    help="instead: forward time of the original against heapr, int8, int4 and heapr + int4")
    dr = sub.add_parser("drift", help="DriftMoE against river's HT, ARF, SRP, leveraging bagging on drifting streams")
    dr.add_argument("--json", action="store_true", help="print the records as a JSON list")
    dr.add_argument("--quick", action="store_true", help="200-instance streams: a smoke run")
    dr.add_argument("--length", type=int, default=6_000,
                    help="instances per synthetic stream; real data: at most half as many (default 6000)")
    dr.add_argument("--stream", action="append", help="run only this stream (repeatable; default: all)")
    dr.add_argument("--model", action="append", help="run only this contender (repeatable; default: all)")
    dr.add_argument("--seed", type=int, default=0, help="streams, ensembles and routers (default 0)")
    mt = sub.add_parser("multitask", help="shared bottom, MMoE, PLE, HoME, TaskExpert on synthetic tasks of set "
                        "correlation and bundled tabular data")
    mt.add_argument("--json", action="store_true", help="print the records as a JSON list")
    mt.add_argument("--quick", action="store_true", help="500 samples, 2 epochs, 1 seed: a smoke run")
    mt.add_argument("--seeds", type=int, default=3, help="seeds per setting (medians; default 3)")
    cl = sub.add_parser("continual", help="TAME and SEMA against sequential fine-tuning on recurring permuted digits")
    cl.add_argument("--json", action="store_true", help="print the records as a JSON list")
    cl.add_argument("--quick", action="store_true", help="3 segments of 2 epochs, 1 seed: a smoke run")
    cl.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    do = sub.add_parser("domain", help="global/local expert with a gate; Meta-DMoE test-time distillation")
    do.add_argument("--json", action="store_true", help="print the records as a JSON list")
    do.add_argument("--quick", action="store_true", help="3 epochs, 1 seed: a smoke run")
    do.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    add_decode_parser(sub)
    from moekit.bench.seeds import add_arguments as add_seeds_arguments

    add_seeds_arguments(sub.add_parser("seeds", help="issue 20's seed systems against their baselines on small "
                                       "offline tasks, the paper's claim beside each"))
    add_serve_parser(sub)
    from moekit.bench.compose import add_arguments as add_compose_arguments

    add_compose_arguments(sub.add_parser("compose", help="domain LoRAs routed (LoRA-MoE, CoE, Glider, K-shot, "
                                         "P-Adapters) and merged (sum, PEFT, orthogonal, sparse FT, ComPEFT): "
                                         "per-domain perplexity, routing accuracy, the issue's targets"))
    mk = sub.add_parser("make", help="MoEfication of the real all-MiniLM-L6-v2 (E 8/16/32, 12.5-50%% active, each "
                        "partition and router): embedding cosine, overlap@10, gloss retrieval, speed, vs dense; "
                        "--lm MODEL: a dense causal LM MoEfied / upcycled / BTX, perplexity vs dense")
    from moekit.bench.make import add_arguments as add_make_arguments

    add_make_arguments(mk)
    of = sub.add_parser("offload", help="experts on disk: budgets x cache policies x prefetch modes against the "
                        "resident model and the physical bound; trace replay with Belady; --large-gb under a cgroup")
    of.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    of.add_argument("--json", action="store_true", help="print the records as a JSON list")
    of.add_argument("--quick", action="store_true", help="2 prompts, 4 tokens, 25%%/100%%, lru: a smoke run")
    of.add_argument("--repeats", type=int, default=3, help="interleaved rounds per contender (median; default 3)")
    of.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    of.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    of.add_argument("--large-gb", type=float, default=None,
                    help="also: a random-weight checkpoint with this many GB of experts, run under --cgroup-mb")
    of.add_argument("--cgroup-mb", type=int, default=None, help="memory cap for the --large-gb children (cgroup v1)")
    of.add_argument("--large-only", action="store_true", help="with --large-gb: only the large run (not moekit-tiny)")
    of.add_argument("--save-predictor", metavar="DIR", default=None,
                    help="also save the trained path predictor there (for moekit generate --prefetch predictor)")


def run(args: argparse.Namespace) -> int:
    repeats = getattr(args, "repeats", None)
    if repeats is not None and repeats < 1:  # a median of no rounds: refused before anything runs
        raise ConfigError(f"--repeats={repeats}: expected a positive integer")
    if args.what == "compose":
        from moekit.bench.compose import run as run_compose

        return run_compose(args)
    if args.what == "seeds":
        from moekit.bench.seeds import run as run_seeds

        return run_seeds(args)
    if args.what == "offload":
        import torch

        from moekit.bench.offload import COLUMNS as OFFLOAD_COLUMNS
        from moekit.bench.offload import bench_offload

        if args.repeats < 1 or args.tokens < 2:
            raise ConfigError(f"--repeats={args.repeats} --tokens={args.tokens}: expected at least 1 and 2")
        if args.large_gb is not None and not args.large_gb > 0:
            raise ConfigError(f"--large-gb={args.large_gb}: expected a positive size")
        if args.large_only and args.large_gb is None:
            raise ConfigError("--large-only: expected --large-gb too")
        if args.cgroup_mb is not None and args.cgroup_mb < 1:
            raise ConfigError(f"--cgroup-mb={args.cgroup_mb}: expected a positive number of MiB")
        dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        records = [] if args.large_only else bench_offload(args.model, args.quick, args.repeats, args.tokens, dtype,
                                                           save_predictor=args.save_predictor)
        summary = ""
        if args.large_gb is not None:
            from moekit.bench.offload_large import bench_large
            from moekit.bench.offload_large import summary as large_summary

            records += bench_large(args.large_gb, args.cgroup_mb, tokens=4 if args.quick else args.tokens)
            summary = large_summary(records)
        rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        print(json.dumps(records, indent=1) if args.json else format_table(rows, OFFLOAD_COLUMNS))
        if summary:  # beside the JSON (stderr), after the table (stdout)
            print(summary, file=sys.stderr if args.json else sys.stdout)
        return 0
    if args.what == "make":
        from moekit.bench.make import run as run_make

        records, cols = run_make(args)
        print(json.dumps(records, indent=1) if args.json else format_table(records, cols))
        return 0
    if args.what == "decode":
        return run_decode(args)
    if args.what == "serve":
        return run_serve(args)
    if args.what == "tune":
        from moekit.bench.tune import TOKENS, TUNE_COLUMNS, bench_tune

        records = bench_tune(args.model, args.dtype, (1, 4, 64) if args.quick else TOKENS)
        print(json.dumps(records, indent=1) if args.json else format_table(records, TUNE_COLUMNS))
        return 0
    if args.what == "drift":
        from moekit.bench.drift import COLUMNS as DRIFT_COLUMNS
        from moekit.bench.drift import bench_drift

        if args.length < 8:
            raise ConfigError(f"--length={args.length}: expected at least 8 instances")
        records = bench_drift(args.length, args.length // 2, args.seed, args.quick, args.model, args.stream)
        rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        print(json.dumps(records, indent=1) if args.json else format_table(rows, DRIFT_COLUMNS))
        return 0
    if args.what in ("continual", "domain"):
        from moekit.bench.continual import COLUMNS as CL_COLUMNS
        from moekit.bench.continual import bench_continual
        from moekit.bench.domain import COLUMNS as DO_COLUMNS
        from moekit.bench.domain import bench_domain

        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds}: expected a positive integer")
        bench_fn, CL_COLUMNS = (bench_continual, CL_COLUMNS) if args.what == "continual" else (bench_domain, DO_COLUMNS)
        records = bench_fn(args.seeds, args.quick)
        rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        print(json.dumps(records, indent=1) if args.json else format_table(rows, CL_COLUMNS))
        return 0
    if args.what == "multitask":
        from moekit.bench.multitask import COLUMNS as MT_COLUMNS
        from moekit.bench.multitask import bench_multitask

        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds}: expected a positive integer")
        records = bench_multitask(args.seeds, args.quick)
        rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records]
        print(json.dumps(records, indent=1) if args.json else format_table(rows, MT_COLUMNS))
        return 0
    if args.what == "routers":
        from moekit.bench.routers import bench_reroute, bench_routers, table_rows

        if args.inference:
            records = bench_reroute(max_tokens=512 if args.quick else 8192)
            rows = [{"setting": r["setting"], "experts_per_token": r["experts_per_token"],
                     **{f"{m}_{d}": v for m in ("loss", "accuracy") for d, v in (r[m] or {}).items()}}
                    for r in records]
            cols = list(dict.fromkeys(c for r in rows for c in r))
        else:
            records = bench_routers(args.router, args.steps, args.quick, seed=args.seed)
            rows, cols = table_rows(records)
        print(json.dumps(records, indent=1) if args.json else format_table(rows, cols))
        return 0
    if args.what == "compress" and args.speed:
        from moekit.bench.compress_speed import SPEED_COLUMNS, bench_compress_speed

        records = bench_compress_speed(args.model, args.data, **({"prefill": 32, "repeats": 2, "cal_tokens": 256}
                                                                 if args.quick else {}))
        print(json.dumps(records, indent=1) if args.json else format_table(records, SPEED_COLUMNS))
        return 0
    if args.what == "compress":
        from moekit.bench.compress import COLUMNS, bench_compress

        records = bench_compress(args.model, args.data, **({"cal_tokens": 256, "eval_tokens": 256} if args.quick
                                                           else {}))
        print(json.dumps(records, indent=1) if args.json else format_table(records, COLUMNS))
        return 0
    if args.repeats < 1:
        raise ConfigError(f"--repeats={args.repeats}: expected a positive integer")
    if args.what == "hf-accelerate":
        records, cols = bench_hf_accelerate(args.repeats, args.quick), HF_COLUMNS
    elif args.what == "train":
        from moekit.bench.train import bench_train

        records = bench_train(args.repeats, args.quick, args.dtype)
        cols = sorted({k for r in records for k in r}, key=lambda k: (k != "case", k))
    else:
        records, cols = bench_layer(args.case, args.repeats, args.quick, args.dtype), None
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_table(records, cols))
    return 0


def format_table(records: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or ["case", "tokens", "dtype", "moekit_ms", "transformers_eager_ms", "transformers_grouped_mm_ms",
                    "dense_ms", "floor_ms", "dense_over_moekit"]
    rows = [[("-" if r.get(c) is None else str(r[c])) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def add_decode_parser(sub) -> None:
    de = sub.add_parser("decode", help="greedy decoding tokens/s: transformers' generate, moekit's decode path and "
                        "llama.cpp (when importable), fp32/bf16/int8/int4, 1 and 2 threads")
    de.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    de.add_argument("--json", action="store_true", help="print the records as a JSON list")
    de.add_argument("--quick", action="store_true", help="8 new tokens, one round, the first thread count: a smoke run")
    de.add_argument("--large", action="store_true",
                    help="instead of MODEL: a random-weight ~430M-parameter model of moekit-tiny's family, built on "
                    "the fly")
    de.add_argument("--large-family", choices=["deepseek_v3", "qwen3_moe"], default=None,
                    help="with --large: the family (default moekit-tiny's, deepseek_v3)")
    de.add_argument("--repeats", type=int, default=5, help="timed rounds per contender (median; default 5)")
    de.add_argument("--threads", type=int, action="append", help="thread count (repeatable; default 1 and 2)")
    de.add_argument("--dtype", action="append", choices=["fp32", "bf16", "int8", "int4"],
                    help="dtype (repeatable; default all four)")
    de.add_argument("--no-peers", action="store_true", help="leave llama.cpp out even when it is importable")
    de.add_argument("--compile", action="store_true", help="add moekit's decode path under torch.compile")


def run_decode(args: argparse.Namespace) -> int:
    from moekit.bench.decode import BENCH_DTYPES, COLUMNS, bench_decode

    records = bench_decode(args.model, large=args.large, quick=args.quick, repeats=args.repeats,
                           threads=tuple(args.threads or (1, 2)), dtypes=tuple(args.dtype or BENCH_DTYPES),
                           peers=not args.no_peers, compiled=args.compile, large_family=args.large_family)
    print(json.dumps(records, indent=1) if args.json else format_table(records, COLUMNS))
    return 0


def add_serve_parser(sub) -> None:
    se = sub.add_parser("serve", help="moekit serve under concurrent streaming clients on localhost: latency, "
                        "tokens/s, 8 vs 1 clients, expert-aware vs first-come batching, completeness")
    se.add_argument("--json", action="store_true", help="print the records as a JSON list")
    se.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    se.add_argument("--seconds", type=float, default=120.0, help="length of the load phase (default 120)")
    se.add_argument("--max-batch", type=int, default=8, help="the server's rows per decode step (default 8)")
    se.add_argument("--resident", type=int, default=4,
                    help="scheduler phase: sequences kept resident, as a multiple of --max-batch (default 4)")
    se.add_argument("--quick", action="store_true", help="at most 8 clients, 4 s, 8 tokens: a smoke run")


def run_serve(args: argparse.Namespace) -> int:
    from moekit.bench.serve import COLUMNS, bench_serve

    if args.clients < 1 or args.seconds <= 0 or args.max_batch < 1 or args.resident < 1:
        raise ConfigError(f"--clients {args.clients} / --seconds {args.seconds} / --max-batch {args.max_batch} / "
                          f"--resident {args.resident}: expected positive values")
    records = bench_serve(args.clients, args.seconds, args.quick, args.max_batch, resident=args.resident)
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records]
    print(json.dumps(records, indent=1) if args.json else format_table(rows, COLUMNS))
    return 0
