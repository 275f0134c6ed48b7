"""Checkpoints the tests build on disk once per session, so that tests do not follow the shipped default's shape."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.cache
def v1_shaped_checkpoint() -> Path:
    """The subject of the checkpoint probes: a checkpoint shaped like moekit-tiny v1 (Qwen3-MoE, 4 layers of 8 experts
    of width 384, hidden 256, bf16, per-expert tensors as `moekit.hf.save` writes them), random weights, the default
    model's tokenizer. Built once per session, so the probes' expected messages do not follow the shipped default."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit.hf as mh
    from moekit.default import default_model_path
    from moekit.train.trainer import _TINY_V1

    kw = dict(_TINY_V1)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, vocab_size=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    out = Path(tempfile.mkdtemp(prefix="moekit-probe-")) / "model"
    atexit.register(shutil.rmtree, out.parent, ignore_errors=True)
    mh.save(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(default_model_path() / name, out / name)
    return out
