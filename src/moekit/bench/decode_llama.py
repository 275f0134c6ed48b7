"""llama.cpp as a peer in `moekit bench decode`: the same checkpoint converted to GGUF by the converter vendored in
llama-cpp-python's source distribution (`make bench-peers` unpacks it under build/peers/ and installs the
package), then greedy decoding through `llama_cpp.Llama` on the same token ids.

The converter refuses tokenizers whose BPE pre-tokenizer hash it does not know, moekit-tiny's among them. moekit's
tokenizers pre-tokenize exactly as GPT-2 does (one ByteLevel step with GPT-2's regex), so at conversion time, in the
converter's own process, an unrecognised hash of such a tokenizer is mapped to "gpt-2"; nothing on disk is edited.
The benchmark hands llama.cpp token ids, never text, so the mapping only has to be accepted, not exact.
transformers 5's DeepSeek-V3 config states no `scoring_func` (its router is always sigmoid), and without it the
converter leaves llama.cpp's gating at softmax; the converter's process is told "sigmoid" for such configs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from moekit.errors import ConfigError

# GGUF types for moekit's dtypes: f32/bf16 as stored, q8_0 (blocks of 32, one fp16 scale) for int8, q4_0 (blocks of
# 32, one fp16 scale) for int4. The converter writes f32/bf16/q8_0; q4_0 comes from llama.cpp's quantizer.
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}

_CONVERT = r"""
import json, sys
from pathlib import Path
src, model_dir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf as conv
import conversion.base as base

original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(model_dir) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            print("moekit: unrecognised BPE pre-tokenizer hash of a GPT-2 ByteLevel tokenizer mapped to gpt-2",
                  file=sys.stderr)
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
original_params = base.TextModel.set_gguf_parameters

def set_gguf_parameters(self):
    if self.hparams.get("model_type") == "deepseek_v3":
        self.hparams.setdefault("scoring_func", "sigmoid")
    original_params(self)

base.TextModel.set_gguf_parameters = set_gguf_parameters
sys.argv = ["convert_hf_to_gguf.py", model_dir, *args]
conv.main()
"""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return converter_dir() is not None


class PeerUnavailable(ConfigError):
    """llama.cpp cannot run this checkpoint (the benchmark goes on without it)."""


def unsupported(model_dir: Path) -> str | None:
    """Why llama.cpp cannot load `model_dir` once converted, when known beforehand; else None. Its DeepSeek-2
    loader requires q_lora_rank except for the "lite" layer counts it knows (26, 27)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") in ("deepseek_v2", "deepseek_v3") and config.get("q_lora_rank") is None \
            and config.get("num_hidden_layers") not in (26, 27):
        return ("llama.cpp cannot load this model: its DeepSeek-2 loader requires q_lora_rank unless the model has "
                "26 or 27 layers")
    return None


def converter_dir() -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py: $MOEKIT_LLAMA_CPP_SRC, else the newest
    build/peers/llama_cpp_python-*/vendor/llama.cpp under the current directory."""
    env = os.environ.get("MOEKIT_LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else sorted(Path("build/peers").glob("llama_cpp_python-*/vendor/llama.cpp"))
    found = [c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()]
    return found[-1].resolve() if found else None


def convert(model_dir: Path, out_dir: Path, dtype: str) -> Path:
    """`model_dir` (a transformers checkpoint with tokenizer.json) as a GGUF file of `dtype`'s type in `out_dir`."""
    src = converter_dir()
    if src is None:
        raise ConfigError("llama.cpp's convert_hf_to_gguf.py not found; expected `make bench-peers` to unpack it "
                          "under build/peers/, or MOEKIT_LLAMA_CPP_SRC set to a llama.cpp source tree")
    gtype = GGUF_TYPES[dtype]
    out = out_dir / f"model-{gtype}.gguf"
    if out.exists():
        return out
    if gtype == "q4_0":
        return _quantize(convert(model_dir, out_dir, "fp32"), out, "q4_0")
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(model_dir), "--outfile", str(out),
                           "--outtype", gtype], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise ConfigError(f"{model_dir}: llama.cpp's converter failed ({gtype}): {tail}")
    return out


def _quantize(src: Path, out: Path, gtype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[gtype]
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        raise ConfigError(f"{src}: llama.cpp's quantizer failed ({gtype}, code {rc})")
    tmp.rename(out)
    return out


def greedy_runner(gguf: Path, threads: int, n_ctx: int) -> Callable[[list[int], int], list[int]]:
    """A function `(prompt_ids, n) -> n greedy token ids` over one loaded llama.cpp model (KV cache cleared before
    each call, so every call prefills the whole prompt)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=n_ctx, logits_all=False, verbose=False)
    except ValueError as err:
        raise PeerUnavailable(f"{gguf.name}: llama.cpp could not load it ({err})") from None

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            out.append(int(token))
            if len(out) == n:
                break
        return out

    return run


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def describe(gguf: Path) -> dict:
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
