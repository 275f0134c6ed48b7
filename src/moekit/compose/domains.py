"""Four domains of real text for composing LoRA experts, with document-level splits, and their token windows.

- "prose": Python's documentation (reST sources of Debian's python3.11-doc, else pydoc_data), as moekit.train's
  corpus reads it.
- "code": the standard library's .py files, as moekit.train's corpus reads them.
- "glosses": WordNet's glosses and examples (Debian `wordnet-base`, /usr/share/wordnet/data.{noun,verb,adj,adv});
  a document is a chunk of `chunk` consecutive synsets of one lexicographer file ("noun.animal", ...).
- "fortunes": Debian `fortunes` (/usr/share/games/fortunes/*, entries separated by lines of '%'); a document is a
  chunk of `chunk` consecutive entries of one file.

A document's split is `moekit.train.corpus.split_of(domain, source, seed)` (a hash of its id), so documents, not
windows, are held out. A missing Debian package is a one-line error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from moekit.data import encode
from moekit.errors import ConfigError, UnknownNameError
from moekit.train.corpus import Document, _selection_key, build_corpus, split_of

DOMAINS = ("prose", "code", "glosses", "fortunes")
WORDNET_DIR = "/usr/share/wordnet"
FORTUNES_DIR = "/usr/share/games/fortunes"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SPLITS = ("train", "validation", "test")


class MissingPackageError(ConfigError):
    """A domain's Debian package is not installed."""


def _missing(package: str, path: str, domain: str) -> MissingPackageError:
    return MissingPackageError(f"domain {domain!r}: {path} not found; install Debian's {package} "
                               f"(apt-get install {package}) or pass its directory")


# WordNet's lexicographer files by number (lexnames(5WN)); a `lexnames` file in the data directory overrides it.
LEXNAMES = ("adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
            "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
            "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
            "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
            "verb.weather", "adj.ppl")


def _lexnames(root: Path) -> dict[int, str]:
    """lexicographer file number -> name (5 -> "noun.animal")."""
    names = dict(enumerate(LEXNAMES))
    path = root / "lexnames"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    return names


def _synset_text(line: str) -> tuple[int, str] | None:
    """(lexicographer file number, "word, word: gloss") of one data.* line; None for the licence header."""
    if not line or line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5:
        return None
    try:
        lex, count = int(fields[1]), int(fields[3], 16)
    except ValueError:
        return None
    words = [w.replace("_", " ") for w in fields[4:4 + 2 * count:2]]
    words = [w.rsplit("(", 1)[0] if w.endswith(")") else w for w in words]  # adjective markers: "good(a)"
    return lex, f"{', '.join(words)}: {gloss.strip()}"


def glosses_documents(wordnet_dir: str | None = None, chunk: int = 50) -> list[Document]:
    """WordNet glosses, `chunk` synsets per document, grouped by lexicographer file."""
    root = Path(wordnet_dir or WORDNET_DIR)
    files = [root / name for name in WORDNET_FILES if (root / name).is_file()]
    if not files:
        raise _missing("wordnet-base", str(root / "data.noun"), "glosses")
    names = _lexnames(root)
    groups: dict[str, list[str]] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parsed = _synset_text(line)
            if parsed is not None:
                groups.setdefault(names.get(parsed[0], f"{path.name}.{parsed[0]:02d}"), []).append(parsed[1])
    return [Document(text="\n".join(lines[i:i + chunk]) + "\n", domain="glosses", source=f"{lex}#{i // chunk}")
            for lex, lines in sorted(groups.items()) for i in range(0, len(lines), chunk)]


def fortune_entries(text: str) -> list[str]:
    """The entries of one fortune file (separated by lines that are exactly '%')."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip("\n"))
    return [e for e in entries if e.strip()]


def fortunes_documents(fortunes_dir: str | None = None, chunk: int = 20) -> list[Document]:
    """Fortune entries, `chunk` per document, per file (the .dat indexes and .u8 links are skipped)."""
    root = Path(fortunes_dir or FORTUNES_DIR)
    files = sorted(p for p in root.glob("*") if p.is_file() and not p.is_symlink() and p.suffix == "") \
        if root.is_dir() else []
    if not files:
        raise _missing("fortunes", str(root), "fortunes")
    docs = []
    for path in files:
        entries = fortune_entries(path.read_text(encoding="utf-8", errors="replace"))
        docs += [Document(text="\n%\n".join(entries[i:i + chunk]) + "\n", domain="fortunes",
                          source=f"{path.name}#{i // chunk}") for i in range(0, len(entries), chunk)]
    return docs


def domain_documents(domains: Sequence[str] = DOMAINS, max_docs_per_domain: int | None = None, seed: int = 0,
                     dirs: dict[str, str] | None = None) -> dict[str, list[Document]]:
    """{domain: documents} for the named domains. dirs may give a directory per domain (prose, code, glosses,
    fortunes) in place of the installed one; max_docs_per_domain keeps a seeded, hash-chosen subset."""
    dirs = dirs or {}
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise UnknownNameError(f"domain {unknown[0]!r} does not exist; expected some of {', '.join(DOMAINS)}")
    if not domains:
        raise ConfigError(f"no domain given; expected some of {', '.join(DOMAINS)}")
    out: dict[str, list[Document]] = {}
    if "prose" in domains or "code" in domains:
        corpus = build_corpus(dirs.get("prose"), dirs.get("code"), max_docs_per_domain, seed)
        for name in ("prose", "code"):
            if name in domains:
                out[name] = [doc for doc in corpus.documents if doc.domain == name]
    if "glosses" in domains:
        out["glosses"] = glosses_documents(dirs.get("glosses"))
    if "fortunes" in domains:
        out["fortunes"] = fortunes_documents(dirs.get("fortunes"))
    for name in ("glosses", "fortunes"):
        if name in out and max_docs_per_domain is not None:
            out[name] = sorted(sorted(out[name], key=lambda d: _selection_key(d.domain, d.source, seed))
                               [:max_docs_per_domain], key=lambda d: d.source)
    return {name: out[name] for name in domains}


def split_documents(docs: Sequence[Document], split: str, seed: int = 0) -> list[Document]:
    """The documents of `docs` in one split ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} does not exist; expected one of {', '.join(SPLITS)}")
    return [doc for doc in docs if split_of(doc.domain, doc.source, seed) == split]


def token_windows(tokenizer, docs: Sequence[Document], seq_len: int, max_windows: int | None = None) -> Tensor:
    """Windows [N, seq_len] of token ids: the documents encoded (EOS after each, where the tokenizer has one),
    concatenated in order and cut into non-overlapping windows (the last partial one is dropped)."""
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len}; expected at least 2 tokens per window")
    need = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    for doc in docs:
        ids += encode(tokenizer, doc.text)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise ConfigError(f"{len(docs)} documents give {len(ids)} tokens; expected at least one window of "
                          f"{seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def domain_windows(tokenizer, domains: Sequence[str] = DOMAINS, split: str = "train", seq_len: int = 128,
                   max_windows: int | None = None, seed: int = 0, max_docs_per_domain: int | None = None,
                   dirs: dict[str, str | os.PathLike] | None = None) -> dict[str, Tensor]:
    """{domain: windows [N, seq_len]} of one split, for `tokenizer`."""
    docs = domain_documents(domains, max_docs_per_domain, seed, {k: str(v) for k, v in (dirs or {}).items()})
    return {name: token_windows(tokenizer, split_documents(d, split, seed), seq_len, max_windows)
            for name, d in docs.items()}
