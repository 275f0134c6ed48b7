"""The embedded default model, `moekit-tiny`: a DeepSeek-V3 MoE checkpoint trained by `moekit train --recipe tiny`,
shipped inside the package with its tokenizer and held-out test split, so every verb works offline; and its dense
twin `moekit-tiny-dense` (`moekit train --recipe tiny-dense`: the same network with a dense MLP of equal active
FLOPs, trained on the same data with the same seed), the reference for the model card and the input of dense-to-MoE
conversion."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import MoekitError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "moekit-tiny"
DEFAULT_DENSE_DIR = Path(__file__).parent / "assets" / "moekit-tiny-dense"


def _checked(path: Path, what: str) -> Path:
    if not (path / "config.json").exists():
        raise MoekitError(f"{path}: the embedded {what} is missing; expected config.json and model.safetensors there "
                          "(reinstall moekit)")
    return path


def default_model_path() -> Path:
    return _checked(DEFAULT_MODEL_DIR, "default model")


def default_dense_model_path() -> Path:
    return _checked(DEFAULT_DENSE_DIR, "dense twin of the default model")


def default_model(dtype=None):
    """moekit-tiny as a transformers model in eval mode (float32 unless `dtype` is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype or torch.float32).eval()


def default_dense_model(dtype=None):
    """moekit-tiny-dense, the default model's dense twin, as a transformers model in eval mode (float32 unless
    `dtype` is given). It shares the default model's tokenizer and held-out split."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_dense_model_path(), dtype=dtype or torch.float32).eval()


def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def default_test_split() -> list[dict]:
    """The held-out documents the model never trained on: dicts with `domain`, `source`, `text`."""
    path = default_model_path() / "test_split.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
