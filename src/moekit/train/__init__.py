"""Training: the offline two-domain corpus and its tokenizer, the trainer, expert parallelism."""

from moekit.train.corpus import Corpus, Document, build_corpus
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = ["Corpus", "Document", "build_corpus", "load_tokenizer", "save_tokenizer", "train_tokenizer"]
