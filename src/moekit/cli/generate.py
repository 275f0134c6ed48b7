"""`moekit generate [MODEL] --prompt TEXT [--max-new-tokens N] [--dtype fp32|bf16] [--json]`: streams the new text
to stdout as it is produced, then prefill and decode tokens/s on stderr (or one JSON record with --json).
`--expert-memory SIZE [--policy P] [--prefetch MODE]` keeps the experts on disk (`moekit.runtime.offload`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.errors import ConfigError

HELP = "generate text from a prompt on the lean decode path (streams; reports prefill and decode tokens/s)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory (default: moekit-tiny)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--experts", choices=["auto", "moekit", "transformers"], default="auto",
                   help="experts through moekit's dispatch, transformers' own forward, or whichever a short "
                        "measurement finds faster (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token steps, with transformers' experts (slow start; measure first)")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of streaming")
    p.add_argument("--expert-memory", metavar="SIZE", default=None,
                   help="keep experts on disk, at most SIZE of them cached (bytes, 2GB, 512MiB, or 25%% of the "
                        "experts); see docs/run.md")
    p.add_argument("--policy", default="lru", help="expert cache policy with --expert-memory: lru, lfu, lfuda, "
                   "moe-infinity, layer-lru, layer-lfu, layer-lfuda (default lru)")
    p.add_argument("--prefetch", default="none", choices=["none", "next-layer", "predictor", "pregate"],
                   help="read experts ahead with --expert-memory (default none); pregate: by the Read-ME pre-gate "
                        "`moekit make --pregate` saved beside the model")
    p.add_argument("--predictor", metavar="DIR", default=None,
                   help="the path predictor for --prefetch predictor (default: MODEL-predictor beside the model)")


def build_model(args: argparse.Namespace):
    """`(model, tokenizer)` as the options ask. Options that change how the model is built or placed (expert
    memory, offloading) belong here; the decode loop below stays the same."""
    from moekit.runtime.decode import DTYPES, load_for_decode

    if getattr(args, "expert_memory", None) is not None:
        from moekit.runtime.offload import open_for_generate

        pregate = pregate_dir(args.model) if args.prefetch == "pregate" else None
        prefetch = "none" if pregate is not None else args.prefetch  # the pre-gate's prefetcher is attached below
        args.offloaded, _, tokenizer = open_for_generate(args.model, args.expert_memory, args.policy, prefetch,
                                                         DTYPES[args.dtype], args.predictor)
        if pregate is not None:
            try:
                args.prefetcher = attach_pregate(args.offloaded, pregate)
            except ConfigError:
                args.offloaded.close()
                raise
        return args.offloaded.model, tokenizer
    if args.compile and args.experts == "moekit":
        raise ConfigError("--compile with --experts moekit: torch.compile cannot trace moekit's dispatch; expected "
                          "--experts transformers (or auto, which --compile turns into transformers)")
    accelerate = False if args.compile else {"auto": "auto", "moekit": True, "transformers": False}[args.experts]
    return load_for_decode(args.model, dtype=args.dtype, accelerate=accelerate)


def pregate_dir(model_path: str | None):
    """The model's directory, which must hold the Read-ME pre-gate `moekit make --pregate` saved beside it."""
    from pathlib import Path

    from moekit.default import default_model_path
    from moekit.make.pregate import PREGATE_CONFIG

    where = Path(default_model_path() if model_path is None else model_path)
    if not (where / PREGATE_CONFIG).is_file():
        raise ConfigError(f"--prefetch pregate: no {PREGATE_CONFIG} in {where}: this model has no pre-gating router "
                          "(Read-ME); expected one saved beside the model by `moekit make --pregate`")
    return where


def attach_pregate(offloaded, where):
    """`--prefetch pregate`: a Prefetcher driven by `PreGate.load(where, model).experts`; None when every expert is
    resident (nothing to prefetch)."""
    from moekit.make.pregate import PREGATE_CONFIG, PreGate
    from moekit.runtime.prefetch import Prefetcher

    if offloaded.store is None:
        return None
    gate = PreGate.load(where, offloaded.model)
    widths = {e.num_experts for e in offloaded.experts.values()}
    if gate.num_layers != len(offloaded.experts) or widths != {gate.num_experts}:
        raise ConfigError(f"{where / PREGATE_CONFIG}: made for {gate.num_layers} MoE layers x {gate.num_experts} "
                          f"experts; expected the model's {len(offloaded.experts)} x {sorted(widths)}")
    return Prefetcher(offloaded, "pregate", pregate=gate.experts)


def sampling_of(args: argparse.Namespace):
    from moekit.runtime.decode import Sampling

    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature}: expected 0 (greedy) or a positive number")
    if args.temperature == 0:
        return None
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


class TextStream:
    """Prints the decoded text of the tokens seen so far as it grows (held back while the last token ends inside a
    multi-byte character)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], ""

    def __call__(self, tokens: list[int]) -> None:
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def decode(args: argparse.Namespace, model, tokenizer) -> dict:
    """Runs the prompt through `Decoder.generate` (streaming unless --json); returns the record."""
    from moekit.core.tune import cpu_info
    from moekit.hf import is_accelerated
    from moekit.runtime.decode import Decoder

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: expected a positive integer")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("--prompt: encodes to no tokens; expected some text")
    decoder = Decoder(model, compile=args.compile)
    stream = None if args.json else TextStream(tokenizer)
    result = decoder.generate(ids, args.max_new_tokens, sampling=sampling_of(args), on_token=stream)
    info = cpu_info()
    experts = ("offloaded" if getattr(args, "offloaded", None) is not None else
               "moekit" if is_accelerated(model) else "transformers")
    return {"prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
            "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            "text": tokenizer.decode(result.tokens[0], skip_special_tokens=True),
            "stop_reason": result.stop_reason[0], "experts": experts,
            "lean_step": decoder.lean, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "cpu": info["cpu"], "cpu_flags": info["cpu_flags"], "torch": torch.__version__}


def run(args: argparse.Namespace) -> int:
    model, tokenizer = build_model(args)
    record = decode(args, model, tokenizer)
    if getattr(args, "offloaded", None) is not None:
        from moekit.runtime.offload import offload_record

        record.update(offload_record(args.offloaded, args.policy, args.prefetch))
        args.offloaded.close()
    if args.json:
        print(json.dumps(record))
    else:
        print()
        print(f"prompt {record['prompt_tokens']} tokens: {record['prefill_tokens_per_s']:.1f} tokens/s; "
              f"{record['new_tokens']} new tokens: {record['decode_tokens_per_s']:.1f} tokens/s "
              f"({record['dtype']}, {record['threads']} threads)", file=sys.stderr)
    return 0
