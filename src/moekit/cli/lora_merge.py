"""`moekit lora merge ADAPTER... --method M --out DIR [--model PATH] [--weight W ...] [--density F] [--svd-rank R]`:
merge PEFT LoRA adapters into one PEFT adapter (sum: the exact sum of the updates, Orthogonal Adaptation's merge;
linear, ties, dare_linear, svd, cat: PEFT's add_weighted_adapter). Also registers
`moekit lora compress ADAPTER --density F --out DIR [--scale lsq|std|auto]` (ComPEFT) and
`moekit lora decompress DIR --out DIR` into the `lora` group (moekit.cli.lora.register)."""

from __future__ import annotations

import argparse
import json

from moekit.cli.lora import register

HELP = "merge PEFT LoRA adapters into one (exact sum / Orthogonal Adaptation, PEFT linear, ties, dare_linear, svd, cat)"


def add_parser(p: argparse.ArgumentParser) -> None:
    from moekit.compose.merge import METHODS

    p.add_argument("adapters", metavar="ADAPTER", nargs="*", help="PEFT LoRA adapter directories")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="adapter directory to write (loads with PeftModel.from_pretrained)")
    p.add_argument("--model", help="base checkpoint the adapters were trained on (default: the default model)")
    p.add_argument("--weight", type=float, action="append", help="one weight per adapter, in order (default 1 each)")
    p.add_argument("--density", type=float, default=0.5, help="ties / dare_linear: fraction kept (default 0.5)")
    p.add_argument("--svd-rank", type=int, help="svd: rank of the result (default: the largest input rank)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from moekit.compose.merge import merge_adapters

    report = merge_adapters(args.adapters, args.method, args.out, args.model, args.weight, args.density,
                            args.svd_rank)
    print(json.dumps(report, indent=1) if args.json else
          f"merged {len(report['adapters'])} adapters ({report['method']}, rank {report['rank']}) into {report['out']}")
    return 0


def _add_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter directory")
    p.add_argument("--density", type=float, default=0.1, help="fraction of entries kept per tensor (default 0.1)")
    p.add_argument("--out", required=True, help="directory to write (compeft.safetensors, compeft.json)")
    p.add_argument("--scale", default="lsq", choices=("lsq", "std", "auto"),
                   help="lsq: least-squares scale (default); std: --alpha times the tensor's std (ComPEFT's); auto: "
                   "alpha chosen on --data from --alpha-grid, lsq kept unless an alpha is better")
    p.add_argument("--alpha", type=float, default=1.0, help="--scale std: multiple of the std (default 1)")
    p.add_argument("--alpha-grid", default="0.5,1,2,3,4,5,6", help="--scale auto: comma-separated alphas")
    p.add_argument("--data", action="append", metavar="FILE", help="--scale auto: validation documents")
    p.add_argument("--model", help="--scale auto: base checkpoint the adapter was trained on (default: the default "
                   "model)")
    p.add_argument("--seq-len", type=int, default=64, help="--scale auto: validation window length (default 64)")
    p.add_argument("--from-zero", action="store_true", help="compress lora_A itself, as if its initialisation were "
                   "0 (for adapters without lora_init.json; default: refuse them, since the update is A - A_init)")
    p.add_argument("--json", action="store_true", help="print the size report as JSON")


def _alpha_grid(text: str) -> tuple[float, ...]:
    from moekit.compose.adapters import AdapterError

    try:
        grid = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        grid = ()
    if not grid or any(not a > 0 for a in grid):
        raise AdapterError(f"--alpha-grid {text}: expected comma-separated positive numbers, e.g. 0.5,1,2")
    return grid


def _run_compress(args: argparse.Namespace) -> int:
    from moekit.compose.adapters import AdapterError
    from moekit.compose.compeft import compress_adapter_dir, tune_adapter_dir

    if args.scale == "auto":
        if not args.data:
            raise AdapterError("--scale auto: no --data; expected validation documents to choose alpha on")
        report = tune_adapter_dir(args.adapter, args.out, args.density, args.model, args.data,
                                  _alpha_grid(args.alpha_grid), args.seq_len, from_zero=args.from_zero)
    else:
        report = compress_adapter_dir(args.adapter, args.out, args.density, args.scale, args.alpha, args.from_zero)
    print(json.dumps(report, indent=1) if args.json else
          f"{report['kept']:,} of {report['entries']:,} entries kept, {report['compression_ratio']:.1f}x smaller "
          f"({report['compression_ratio_golomb']:.1f}x with Golomb-coded positions); written to {report['out']}")
    return 0


def _add_decompress(p: argparse.ArgumentParser) -> None:
    p.add_argument("compressed", metavar="DIR", help="a directory written by moekit lora compress")
    p.add_argument("--out", required=True, help="PEFT adapter directory to write")


def _run_decompress(args: argparse.Namespace) -> int:
    from moekit.compose.compeft import decompress_adapter

    print(json.dumps({"out": str(decompress_adapter(args.compressed, args.out))}))
    return 0


register("compress", "ComPEFT: keep the top-k%% magnitudes of an adapter as signs and one scale per tensor",
         _add_compress, _run_compress)
register("decompress", "a plain PEFT adapter from a moekit lora compress directory", _add_decompress,
         _run_decompress)
