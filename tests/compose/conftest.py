"""Shared tiny fixtures for tests/compose (LoRA experts, adapter routing and merging).

Models are built from configs (no hub, no default model): a dense causal LM (DeepSeek-V3 with every layer dense,
as moekit's dense twin is configured) and two MoEs with transformers v5 fused 3D experts (Qwen3-MoE and
DeepSeek-V3). `*_lm()` builders give fresh random models (PEFT wraps models in place); the `*_dir` fixtures are
saved checkpoints with a tokenizer, for CLI tests. Everything here is small enough for a 2-CPU machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hf.tiny import tiny_model
from threads import one_thread  # noqa: F401  (autouse: one thread for this directory)

DENSE_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # DeepSeek-V3 attention
QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Qwen3-MoE attention

# Short texts of three kinds, for tests that must not depend on Debian packages being installed.
TOY_DOMAINS = {
    "prose": ["The module provides functions for working with files and directories on every platform.",
              "A context manager is an object that defines the runtime context to be established."] * 3,
    "code": ["def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
             "for i in range(10):\n    if i % 2:\n        print(i)\n"] * 3,
    "fortunes": ["A day without sunshine is like, you know, night.\n",
                 "Beware of bugs in the above code; I have only proved it correct, not tried it.\n"] * 3,
}


def dense_lm(seed: int = 0, vocab_size: int = 97) -> torch.nn.Module:
    """A tiny DeepSeek-V3 with no MoE layer (first_k_dense_replace = num_hidden_layers = 2), float32, eval mode."""
    return tiny_model("deepseek_v3", seed=seed, num_hidden_layers=2, first_k_dense_replace=2, vocab_size=vocab_size)


def moe_lm(seed: int = 0, vocab_size: int = 97) -> torch.nn.Module:
    """A tiny Qwen3-MoE (6 experts, top-2; experts fused as gate_up_proj [E, 2I, H] and down_proj [E, H, I])."""
    return tiny_model("qwen3_moe", seed=seed, vocab_size=vocab_size)


def dsv3_moe_lm(seed: int = 0, vocab_size: int = 97) -> torch.nn.Module:
    """A tiny DeepSeek-V3 MoE: layer 0 dense, layers 1-2 with 6 routed experts and one shared expert."""
    return tiny_model("deepseek_v3", seed=seed, vocab_size=vocab_size)


def save_random_adapter(model: torch.nn.Module, out: Path, seed: int, r: int = 4, alpha: float = 8.0,
                        targets: list[str] | None = None, **lora_options) -> Path:
    """Save a PEFT LoRA adapter with random (nonzero) A and B on `model` (wrapped in place, then unloaded)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ["o_proj"], init_lora_weights=False,
                        **lora_options)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    peft_model.unload()
    return out


@pytest.fixture
def dense_model() -> torch.nn.Module:
    return dense_lm()


@pytest.fixture
def moe_model() -> torch.nn.Module:
    return moe_lm()


@pytest.fixture
def dsv3_moe_model() -> torch.nn.Module:
    return dsv3_moe_lm()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The directory holding the default model's tokenizer files (tokenizer.json, tokenizer_config.json)."""
    from moekit.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save_with_tokenizer(model: torch.nn.Module, out: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, tokenizer, tokenizer_dir) -> Path:
    """A saved tiny dense DeepSeek-V3 with the default model's tokenizer (vocabulary sized to match)."""
    return _save_with_tokenizer(dense_lm(vocab_size=len(tokenizer)), tmp_path_factory.mktemp("dense") / "model",
                                tokenizer_dir)


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, tokenizer, tokenizer_dir) -> Path:
    """A saved tiny Qwen3-MoE with the default model's tokenizer."""
    return _save_with_tokenizer(moe_lm(vocab_size=len(tokenizer)), tmp_path_factory.mktemp("moe") / "model",
                                tokenizer_dir)


@pytest.fixture
def toy_domains() -> dict[str, list[str]]:
    return {name: list(texts) for name, texts in TOY_DOMAINS.items()}
