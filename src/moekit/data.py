"""Reading the text that inspect, eval and compress run a model on, and cutting it into context-sized windows.

A data file is either JSON lines, one document per line as an object with `text` and optionally `domain` (or
`task`) and `source` (the format of moekit-tiny's `test_split.jsonl`), or a UTF-8 text file that is one document
whose domain is the file's stem. Documents longer than the model's context are cut into several windows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.errors import MoekitError


class DataError(MoekitError, ValueError):
    """A data file is missing, empty, binary or malformed."""


@dataclass(frozen=True)
class TextDoc:
    text: str
    domain: str | None  # a domain or task label; None when the file gives none
    source: str  # where it came from: "file.jsonl:LINE" or the file path


@dataclass(frozen=True)
class Window:
    """One model input: ids [L] (L <= seq_len), from document `doc` starting at token `start` of it."""

    ids: Tensor
    doc: int
    domain: str | None
    start: int


def _read_text(path: Path) -> str:
    from moekit.files import MAX_DATA_BYTES, read_bounded

    raw = read_bounded(path, MAX_DATA_BYTES, "text or .jsonl data file", DataError)
    if b"\0" in raw[:65536]:
        raise DataError(f"{path}: binary file (NUL bytes); expected UTF-8 text or JSON lines")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); expected UTF-8 text or JSON lines") from None


def _read_jsonl(path: Path, text: str) -> list[TextDoc]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{n}: field 'text' missing or not a string; expected {{\"text\": ..., "
                            "\"domain\": ...}")
        label = obj.get("domain", obj.get("task"))
        if label is not None and not isinstance(label, str):
            raise DataError(f"{path}:{n}: field 'domain' is {type(label).__name__}; expected a string")
        if obj["text"]:
            docs.append(TextDoc(obj["text"], label, str(obj.get("source", f"{path.name}:{n}"))))
    return docs


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> list[TextDoc]:
    """The documents of every file in `paths`, in order. Raises DataError for a file with no text in it."""
    docs: list[TextDoc] = []
    for p in paths:
        path = Path(p)
        text = _read_text(path)
        found = _read_jsonl(path, text) if path.suffix == ".jsonl" else \
            ([TextDoc(text, path.stem, str(path))] if text.strip() else [])
        if not found:
            raise DataError(f"{path}: no text in it; expected at least one non-empty document")
        docs.extend(found)
    return docs


def default_documents() -> list[TextDoc]:
    """moekit-tiny's held-out test split (prose and code), the data every verb uses when given none."""
    from moekit.default import default_test_split

    return [TextDoc(d["text"], d.get("domain"), d.get("source", "")) for d in default_test_split()]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, followed by the tokenizer's EOS when it has one (documents end the way they trained)."""
    # transformers tokenizers warn when a text is longer than their model_max_length; windows() cuts it anyway
    quiet = {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}
    ids = list(tokenizer.encode(text, add_special_tokens=False, **quiet))
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if eos is not None else ids


def windows(tokenizer, docs: Sequence[TextDoc], seq_len: int, max_tokens: int | None = None) -> list[Window]:
    """Each document's tokens cut into consecutive windows of at most `seq_len` (no overlap, none dropped), until
    `max_tokens` tokens in all (None: everything)."""
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: expected a positive window length")
    out: list[Window] = []
    total = 0
    for i, doc in enumerate(docs):
        ids = encode(tokenizer, doc.text)
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            if max_tokens is not None:
                chunk = chunk[:max_tokens - total]
            if not chunk:
                return out
            out.append(Window(torch.tensor(chunk, dtype=torch.long), i, doc.domain, start))
            total += len(chunk)
    return out


def context_length(model, default: int = 2048) -> int:
    """The longest input the model takes (its config's `max_position_embeddings`), else `default`."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or default)
