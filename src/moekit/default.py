"""The embedded default model, `moekit-tiny`: a Qwen3-MoE checkpoint trained by `moekit train --recipe tiny`,
shipped inside the package with its tokenizer and held-out test split, so every verb works offline."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import MoekitError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "moekit-tiny"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise MoekitError(f"{DEFAULT_MODEL_DIR}: the embedded default model is missing; expected config.json and "
                          "model.safetensors there (reinstall moekit)")
    return DEFAULT_MODEL_DIR


def default_model(dtype=None):
    """moekit-tiny as a transformers model in eval mode (float32 unless `dtype` is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype or torch.float32).eval()


def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def default_test_split() -> list[dict]:
    """The held-out documents the model never trained on: dicts with `domain`, `source`, `text`."""
    path = default_model_path() / "test_split.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
