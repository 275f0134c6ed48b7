"""An offline text corpus in two domains (English technical prose, Python source) with deterministic splits.

Prose comes from the reST sources of Debian's ``python3.11-doc`` when installed, else from Python's own
``pydoc_data.topics``; code from the ``.py`` files of Python's standard library. Each document's split is a
function of its domain, its source (a path relative to its root, or a topic key) and the seed only, so the
same inputs give the same splits on every machine, and adding a document never moves another one.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from moekit.errors import ConfigError
from moekit.files import MAX_DATA_BYTES

DEFAULT_PROSE_DIR = "/usr/share/doc/python3.11/html/_sources"
PROSE_SUFFIX = ".rst.txt"
CODE_SUFFIX = ".py"
SKIPPED_CODE_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
DOMAINS = ("prose", "code")
SPLITS = ("train", "validation", "test")
SPLIT_PER_MILLE = (900, 50, 50)  # train / validation / test, out of 1000 hash buckets


@dataclass(frozen=True)
class Document:
    text: str
    domain: str  # "prose" or "code"
    source: str  # path relative to its domain's root (posix), or a pydoc topic key


def split_of(domain: str, source: str, seed: int = 0) -> str:
    """The split ("train", "validation" or "test") a document belongs to: a sha1 bucket of seed, domain, source."""
    digest = hashlib.sha1(f"{seed}\0{domain}\0{source}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    edge = 0
    for name, per_mille in zip(SPLITS, SPLIT_PER_MILLE, strict=True):
        edge += per_mille
        if bucket < edge:
            return name
    raise AssertionError("split buckets do not cover 1000")  # unreachable: the per-mille sum is 1000


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]  # sorted by (domain, source)
    prose_source: str  # "python3.11-doc" (reST sources) or "pydoc_data"
    seed: int = 0
    _splits: dict[str, tuple[Document, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[Document]] = {name: [] for name in SPLITS}
        for doc in self.documents:
            groups[split_of(doc.domain, doc.source, self.seed)].append(doc)
        object.__setattr__(self, "_splits", {name: tuple(docs) for name, docs in groups.items()})

    def split(self, name: str) -> list[Document]:
        """The documents of one split, in corpus order."""
        if name not in self._splits:
            raise ConfigError(f"corpus split {name!r} does not exist; expected one of {', '.join(SPLITS)}")
        return list(self._splits[name])

    def domains(self) -> list[str]:
        return sorted({doc.domain for doc in self.documents})

    def texts(self, split: str | None = None, domain: str | None = None) -> Iterator[str]:
        """Texts of the documents, optionally only one split and/or one domain."""
        docs = self.documents if split is None else self.split(split)
        return (doc.text for doc in docs if domain is None or doc.domain == domain)


def _selection_key(domain: str, source: str, seed: int) -> bytes:
    return hashlib.sha1(f"select\0{seed}\0{domain}\0{source}".encode()).digest()


def _files(root: Path, suffix: str, skip_dirs: frozenset[str] = frozenset()) -> dict[str, Path]:
    """Files under root ending in suffix, keyed by their posix path relative to root, skipping skip_dirs."""
    found = {}
    for path in root.rglob(f"*{suffix}"):
        rel = path.relative_to(root)
        if skip_dirs.intersection(rel.parts[:-1]) or not path.is_file() or path.stat().st_size > MAX_DATA_BYTES:
            continue  # FIFOs, devices and huge files are never opened
        found[rel.as_posix()] = path
    return found


def _read_texts(files: dict[str, Path], domain: str, limit: int | None, seed: int) -> list[Document]:
    """Read files as UTF-8 (skipping undecodable or blank ones); with a limit, a seeded hash picks which."""
    order = sorted(files)
    if limit is not None:
        order.sort(key=lambda source: _selection_key(domain, source, seed))
    docs: list[Document] = []
    with tqdm(
        total=len(order) if limit is None else min(limit, len(order)),
        desc=f"corpus {domain}",
        unit="file",
        leave=False,
        file=sys.stderr,
    ) as bar:
        for source in order:
            if limit is not None and len(docs) >= limit:
                break
            try:
                text = files[source].read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                docs.append(Document(text=text, domain=domain, source=source))
                bar.update(1)
    return docs


def _directory(path: str, what: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"corpus directory {path!r} does not exist or is not a directory; expected {what}")
    return root


def _prose_documents(prose_dir: str | None, limit: int | None, seed: int) -> tuple[list[Document], str]:
    what = f"a directory of reST sources (*{PROSE_SUFFIX}), e.g. {DEFAULT_PROSE_DIR} from python3.11-doc"
    if prose_dir is None and Path(DEFAULT_PROSE_DIR).is_dir():
        prose_dir = DEFAULT_PROSE_DIR
    if prose_dir is not None:
        docs = _read_texts(_files(_directory(prose_dir, what), PROSE_SUFFIX), "prose", limit, seed)
        if not docs:
            raise ConfigError(f"corpus directory {prose_dir!r} has no readable UTF-8 files; expected {what}")
        return docs, "python3.11-doc"
    from pydoc_data.topics import topics

    keys = sorted((k for k, v in topics.items() if v.strip()), key=lambda k: _selection_key("prose", k, seed))
    keys = keys if limit is None else keys[:limit]
    return [Document(text=topics[k], domain="prose", source=k) for k in keys], "pydoc_data"


def default_code_dir() -> str:
    """Python's standard library directory (site-packages and test directories are skipped when reading it)."""
    return sysconfig.get_paths()["stdlib"]


def _code_documents(code_dir: str | None, limit: int | None, seed: int) -> list[Document]:
    what = f"a directory of Python source files (*{CODE_SUFFIX})"
    path = default_code_dir() if code_dir is None else code_dir
    docs = _read_texts(_files(_directory(path, what), CODE_SUFFIX, SKIPPED_CODE_DIRS), "code", limit, seed)
    if not docs:
        raise ConfigError(f"corpus directory {path!r} has no readable UTF-8 files; expected {what}")
    return docs


def build_corpus(
    prose_dir: str | None = None,
    code_dir: str | None = None,
    max_docs_per_domain: int | None = None,
    seed: int = 0,
) -> Corpus:
    """Read the two-domain corpus. prose_dir=None uses python3.11-doc's sources if installed, else pydoc_data;
    code_dir=None uses the standard library. max_docs_per_domain keeps a seeded, hash-chosen subset per domain.
    The seed also salts the split hash."""
    if max_docs_per_domain is not None and max_docs_per_domain < 1:
        raise ConfigError(f"max_docs_per_domain must be a positive integer or None, got {max_docs_per_domain}")
    prose, prose_source = _prose_documents(prose_dir, max_docs_per_domain, seed)
    code = _code_documents(code_dir, max_docs_per_domain, seed)
    documents = tuple(sorted(prose + code, key=lambda doc: (doc.domain, doc.source)))
    return Corpus(documents=documents, prose_source=prose_source, seed=seed)
