"""A byte-level BPE tokenizer trained offline from a corpus split, saved so transformers can load it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moekit.errors import ConfigError
from moekit.files import atomic_write
from moekit.train.corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def train_tokenizer(corpus: Corpus, vocab_size: int = 8192, split: str = "train", min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on one split of the corpus. Any unicode text encodes (no unknown token) and decodes
    back unchanged; the special tokens have ids 0 (end of text) and 1 (padding)."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    texts = list(corpus.texts(split))
    if not texts:
        raise ConfigError(f"corpus split {split!r} has no documents to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike[str], model_max_length: int = 2048) -> Path:
    """Write tokenizer.json and tokenizer_config.json into out_dir (each via a temp file and a rename), loadable by
    transformers' AutoTokenizer.from_pretrained(out_dir) or PreTrainedTokenizerFast(tokenizer_file=...)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"tokenizer output {str(out)!r} exists and is not a directory; expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved by save_tokenizer (its directory or its tokenizer.json)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"tokenizer file {str(file)!r} does not exist; expected a tokenizer.json from save_tokenizer")
    return Tokenizer.from_file(str(file))
