"""`moekit bench decode`: tokens/s of greedy decoding (a 16-token prompt, 128 new tokens) for transformers'
`generate`, moekit's decode path (`moekit.runtime.decode`; its experts through moekit's dispatch or transformers'
forward, whichever `choose_accelerate` times faster for that group: `moekit_experts`) and, when
`llama_cpp` is importable, llama.cpp on the same weights (GGUF, see `moekit.bench.decode_llama`), at each thread
count and dtype: fp32, bf16, int8 and int4 (moekit's group-wise quantized experts from `moekit.compress`; llama.cpp's
q8_0 and q4_0, which also quantize attention and the embeddings).

Every (dtype, threads) group runs its contenders interleaved, round by round in a shuffled order
(`moekit.bench.timing.interleaved`), on the same prompt; a contender's time covers the whole request, prompt
included, so tokens/s = new tokens / median seconds for all of them alike. The ratios come from the same rounds.
`--large` builds a bigger random-weight model of moekit-tiny's family from a config, on the fly (never saved
beyond a temporary directory), so that reading the weights, not Python, bounds a step.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from moekit.bench import decode_llama
from moekit.bench.timing import interleaved
from moekit.errors import ConfigError
from moekit.hf import accelerate, restore
from moekit.runtime.decode import DTYPES, Decoder, choose_accelerate

BENCH_DTYPES = ("fp32", "bf16", "int8", "int4")
COLUMNS = ["model", "dtype", "threads", "transformers_tokens_per_s", "moekit_tokens_per_s", "llama_cpp_tokens_per_s",
           "moekit_over_transformers", "llama_cpp_over_moekit", "same_tokens", "moekit_experts"]


@dataclass(frozen=True)
class LargeShape:
    """moekit-tiny's family and tokenizer, scaled up so that reading the weights bounds a step.

    deepseek_v3 (moekit-tiny v2's family): about 430M parameters, 60M active per token; `q_lora_rank` is set
    because llama.cpp's DeepSeek-2 loader needs it (it assumes no query compression only at 26 or 27 layers).
    qwen3_moe (moekit-tiny v1's family): about 440M parameters, 80M active per token."""

    family: str = "qwen3_moe"  # the field defaults below are this family's shape
    layers: int = 8
    hidden: int = 1024
    experts: int = 32
    k: int = 4
    intermediate: int = 512
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64


LARGE_SHAPES = {
    "deepseek_v3": LargeShape(family="deepseek_v3", experts=64, k=6, intermediate=256, heads=8, kv_heads=8),
    "qwen3_moe": LargeShape(),
}


def _large_config(shape: LargeShape):
    """The transformers config of `shape` (its family one of LARGE_SHAPES, as `large_shape` checks)."""
    if shape.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            num_hidden_layers=shape.layers, hidden_size=shape.hidden, num_experts=shape.experts,
            num_experts_per_tok=shape.k, moe_intermediate_size=shape.intermediate,
            intermediate_size=4 * shape.hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim, vocab_size=4096, max_position_embeddings=512, norm_topk_prob=True,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        num_hidden_layers=shape.layers, hidden_size=shape.hidden, n_routed_experts=shape.experts,
        num_experts_per_tok=shape.k, moe_intermediate_size=shape.intermediate, n_shared_experts=1,
        intermediate_size=(shape.k + 1) * shape.intermediate, first_k_dense_replace=0, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, q_lora_rank=shape.hidden // 2, kv_lora_rank=shape.hidden // 4,
        qk_rope_head_dim=shape.head_dim // 2, qk_nope_head_dim=shape.head_dim, v_head_dim=shape.head_dim,
        head_dim=shape.head_dim // 2, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def large_shape(family: str | None = None) -> LargeShape:
    """The large shape of `family`, by default moekit-tiny's own."""
    if family is None:
        import json

        from moekit.default import default_model_path

        family = json.loads((default_model_path() / "config.json").read_text())["model_type"]
    if family not in LARGE_SHAPES:
        raise ConfigError(f"--large-family {family!r}: expected one of {', '.join(LARGE_SHAPES)}")
    return LARGE_SHAPES[family]


def build_large(out_dir: Path, shape: LargeShape) -> Path:
    """A random-weight checkpoint of `shape` with moekit-tiny's tokenizer, saved (fp32) in `out_dir`."""
    import shutil

    from transformers import AutoModelForCausalLM

    from moekit.default import default_model_path

    tiny = default_model_path()
    config = _large_config(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.02)  # tokens spread over the experts as a trained router spreads them
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out_dir / name)
    return out_dir


def variant(base: nn.Module, dtype: str) -> nn.Module:
    """`base` (fp32) as `dtype`: bf16 weights, or its routed experts quantized by moekit.compress (int8, int4)."""
    from moekit.compress.quantize import apply_quant, plan_quant

    if dtype == "fp32":
        return base
    if dtype in DTYPES:
        return copy.deepcopy(base).to(DTYPES[dtype])
    return apply_quant(copy.deepcopy(base), plan_quant(base, None, dtype))


def prompt_ids(tokenizer, length: int) -> list[int]:
    """The first `length` tokens of moekit-tiny's held-out text (the same for every contender and model)."""
    from moekit.default import default_test_split

    text = " ".join(d["text"][:8 * length] for d in default_test_split()[:4])
    ids = tokenizer(text).input_ids[:length]
    if len(ids) < length:
        raise ConfigError(f"prompt: the held-out text gives {len(ids)} tokens; expected {length}")
    return ids


def _contenders(model: nn.Module, ids: list[int], n: int, llama: Callable | None, compiled: bool,
                accelerated: bool) -> dict[str, Callable[[], list[int]]]:
    prompt = torch.tensor([ids])
    plain = Decoder(model)
    fast = Decoder(restore(model), compile=True) if compiled else None
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def transformers() -> list[int]:
        restore(model)
        with torch.no_grad():
            return model.generate(prompt, **kw)[0, len(ids):].tolist()

    def moekit(decoder: Decoder = plain) -> list[int]:
        (accelerate if accelerated else restore)(model)
        return decoder.generate(prompt, n, stop_at_eos=False).tokens[0]

    fns: dict[str, Callable[[], list[int]]] = {"transformers": transformers, "moekit": moekit}
    if fast is not None:  # torch.compile cannot trace moekit's dispatch: transformers' experts here

        def compiled_run() -> list[int]:
            restore(model)
            return fast.generate(prompt, n, stop_at_eos=False).tokens[0]

        fns["moekit_compiled"] = compiled_run
    if llama is not None:
        fns["llama_cpp"] = lambda: llama(ids, n)
    return fns


def _lean(model: nn.Module) -> bool:
    dec = Decoder(model, max_len=2)
    dec.reset()
    return dec.lean


@torch.no_grad()
def bench_decode(model_path: str | None = None, large: bool = False, quick: bool = False, repeats: int = 5,
                 threads: tuple[int, ...] = (1, 2), dtypes: tuple[str, ...] = BENCH_DTYPES, peers: bool = True,
                 compiled: bool = False, prompt: int = 16, new_tokens: int = 128,
                 large_family: str | None = None) -> list[dict[str, Any]]:
    """One record per (dtype, threads): median tokens/s of each contender and their ratios, measured together.
    `large_family` (with `large`): the random model's family, by default moekit-tiny's."""
    from transformers import AutoTokenizer

    from moekit.core.tune import cpu_info
    from moekit.default import default_model_path
    from moekit.hf import load

    bad = [d for d in dtypes if d not in BENCH_DTYPES]
    if bad:
        raise ConfigError(f"dtype {bad[0]!r}: expected one of {', '.join(BENCH_DTYPES)}")
    if repeats < 1 or any(t < 1 for t in threads):
        raise ConfigError(f"repeats={repeats}, threads={list(threads)}: expected positive integers")
    if quick:
        repeats, threads, new_tokens = 1, threads[:1], 8
    use_llama = peers and decode_llama.available()
    info = cpu_info()
    saved_threads = torch.get_num_threads()
    records = []
    with tempfile.TemporaryDirectory(prefix="moekit-bench-decode-") as tmp:
        if large:
            if model_path is not None:
                raise ConfigError("--large builds its own model; expected no MODEL with it")
            shape = large_shape(large_family)
            path = build_large(Path(tmp) / "large", replace(shape, layers=2) if quick else shape)
        else:
            path = Path(model_path) if model_path is not None else default_model_path()
        name = f"large-random-{shape.family}" if large else ("moekit-tiny" if model_path is None else str(model_path))
        peer_note = decode_llama.unsupported(path) if use_llama else None  # why llama.cpp cannot run it
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = load(path, dtype=torch.float32).eval()
        ids = prompt_ids(tokenizer, prompt)
        n_ctx = prompt + new_tokens + 8
        params = sum(p.numel() for p in base.parameters())
        for dtype in tqdm(dtypes, desc="bench decode", unit="dtype"):
            model = variant(base, dtype)
            gguf = decode_llama.convert(path, Path(tmp), dtype) if use_llama and peer_note is None else None
            for t in threads:
                torch.set_num_threads(t)
                llama = None
                if gguf is not None and peer_note is None:
                    try:
                        llama = decode_llama.greedy_runner(gguf, t, n_ctx)
                    except decode_llama.PeerUnavailable as err:
                        peer_note = str(err)
                accelerated = choose_accelerate(model)  # the experts path moekit's decode would pick here
                fns = _contenders(model, ids, new_tokens, llama, compiled, accelerated)
                tokens = {c: f() for c, f in fns.items()}
                ms = interleaved(fns, repeats)
                rate = {c: round(new_tokens / (v / 1e3), 2) for c, v in ms.items()}
                ref = tokens["transformers"]
                agree = {c: next((i for i, (a, b) in enumerate(zip(toks, ref, strict=True)) if a != b), len(ref))
                         for c, toks in tokens.items() if c != "transformers"}
                record = {"model": name, "params": params, "dtype": dtype, "threads": t, "prompt_tokens": prompt,
                          "new_tokens": new_tokens, "repeats": repeats,
                          **{f"{c}_tokens_per_s": r for c, r in rate.items()},
                          "moekit_over_transformers": round(rate["moekit"] / rate["transformers"], 3),
                          "same_tokens": agree["moekit"] == len(ref),
                          "moekit_experts": ("moekit quantized" if dtype in ("int8", "int4") else
                                             "moekit dispatch" if accelerated else "transformers"),
                          "moekit_lean_step": _lean(model),
                          **{f"{c}_tokens_equal_to_transformers": a for c, a in agree.items()}}
                if llama is not None:
                    record |= {"llama_cpp_over_moekit": round(rate["llama_cpp"] / rate["moekit"], 3),
                               "llama_cpp_version": decode_llama.version(), **decode_llama.describe(gguf)}
                elif peer_note is not None:
                    record["llama_cpp"] = peer_note
                records.append(record | {"cpu": info["cpu"], "cpu_flags": info["cpu_flags"],
                                         "cpu_capability": info["cpu_capability"], "torch": torch.__version__})
            restore(model)
            del model
    torch.set_num_threads(saved_threads)
    if not use_llama:
        for r in records:
            r["llama_cpp"] = "not importable" if peers else "not asked"
    return records
