"""The four composition domains: readers, document-level splits, token windows, missing-package errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moekit.compose import domains as dm
from moekit.errors import ConfigError, UnknownNameError

HAS_FORTUNES = Path(dm.FORTUNES_DIR).is_dir()
HAS_WORDNET = (Path(dm.WORDNET_DIR) / "data.noun").is_file()

# WordNet's data-file format (a licence header of lines that start with spaces, then one synset per line); the
# glosses are paraphrased here, for the parser only.
DATA_NOUN = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which exists on its own
00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept; "an example sentence"
01234567 05 n 01 dog 0 000 | a domesticated canine
"""
DATA_ADJ = "00001740 00 a 01 able(a) 0 000 | having the means to do something  \n"
LEXNAMES = "00\tadj.all\t3\n03\tnoun.Tops\t1\n05\tnoun.animal\t1\n"


def test_fortune_entries_split_on_percent_lines():
    text = "First entry\n  -- someone\n%\nSecond\nentry\n%\n\n%\nThird 50% off\n"
    assert dm.fortune_entries(text) == ["First entry\n  -- someone", "Second\nentry", "Third 50% off"]


def test_fortunes_documents_from_a_directory(tmp_path):
    (tmp_path / "wisdom").write_text("%\n".join(f"entry {i}\n" for i in range(7)))
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # the strfile index is skipped
    (tmp_path / "wisdom.u8").symlink_to(tmp_path / "wisdom")
    docs = dm.fortunes_documents(str(tmp_path), chunk=3)
    assert [d.source for d in docs] == ["wisdom#0", "wisdom#1", "wisdom#2"]
    assert docs[0].text == "entry 0\n%\nentry 1\n%\nentry 2\n" and docs[2].text == "entry 6\n"
    assert all(d.domain == "fortunes" for d in docs)


def test_glosses_documents_parse_wordnet_data(tmp_path):
    (tmp_path / "data.noun").write_text(DATA_NOUN)
    (tmp_path / "data.adj").write_text(DATA_ADJ)
    (tmp_path / "lexnames").write_text(LEXNAMES)
    docs = {d.source: d.text for d in dm.glosses_documents(str(tmp_path), chunk=1)}
    assert docs == {"adj.all#0": "able: having the means to do something\n",
                    "noun.Tops#0": "entity: that which exists on its own\n",
                    "noun.Tops#1": 'abstraction, abstract entity: a general concept; "an example sentence"\n',
                    "noun.animal#0": "dog: a domesticated canine\n"}
    assert len(dm.glosses_documents(str(tmp_path), chunk=50)) == 3  # one document per lexicographer file


def test_missing_packages_name_them(tmp_path):
    with pytest.raises(dm.MissingPackageError, match=r"apt-get install wordnet-base"):
        dm.glosses_documents(str(tmp_path))
    with pytest.raises(dm.MissingPackageError, match=r"apt-get install fortunes"):
        dm.fortunes_documents(str(tmp_path / "none"))
    with pytest.raises(UnknownNameError, match="domain 'poetry' does not exist"):
        dm.domain_documents(["poetry"])


def test_splits_are_by_document_and_deterministic(tmp_path):
    (tmp_path / "a").write_text("%\n".join(f"a{i}\n" for i in range(400)))
    docs = dm.fortunes_documents(str(tmp_path), chunk=2)
    parts = {s: dm.split_documents(docs, s) for s in dm.SPLITS}
    sources = [{d.source for d in part} for part in parts.values()]
    assert sum(map(len, sources)) == len(docs) and set.union(*sources) == {d.source for d in docs}
    assert all(parts[s] for s in dm.SPLITS)  # 200 documents: every split has some
    assert dm.split_documents(docs, "test") == parts["test"]
    assert dm.split_documents(docs, "test", seed=1) != parts["test"]
    with pytest.raises(ConfigError, match="split 'dev'"):
        dm.split_documents(docs, "dev")


def test_token_windows_concatenate_documents_with_eos(tokenizer):
    docs = [dm.Document("def f(x):\n    return x\n", "code", "a.py"), dm.Document("x = 1\n", "code", "b.py")]
    ids = tokenizer.encode(docs[0].text) + [tokenizer.eos_token_id] + tokenizer.encode(docs[1].text) + \
        [tokenizer.eos_token_id]
    windows = dm.token_windows(tokenizer, docs, seq_len=4)
    assert windows.shape == (len(ids) // 4, 4)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert dm.token_windows(tokenizer, docs, seq_len=4, max_windows=1).shape == (1, 4)
    with pytest.raises(ConfigError, match="at least one window of 10000"):
        dm.token_windows(tokenizer, docs, seq_len=10000)


def test_prose_and_code_come_from_the_training_corpus(tokenizer):
    out = dm.domain_windows(tokenizer, ["prose", "code"], "train", seq_len=32, max_windows=3, max_docs_per_domain=20)
    assert set(out) == {"prose", "code"} and all(w.shape == (3, 32) and w.dtype == torch.long for w in out.values())
    docs = dm.domain_documents(["code"], max_docs_per_domain=5)["code"]
    assert len(docs) == 5 and all(d.source.endswith(".py") for d in docs)


@pytest.mark.skipif(not HAS_FORTUNES, reason="Debian fortunes not installed (apt-get install fortunes)")
def test_installed_fortunes():
    docs = dm.domain_documents(["fortunes"])["fortunes"]
    assert len(docs) > 50 and not any("\n%\n%\n" in d.text for d in docs)
    assert {d.source.split("#")[0] for d in docs} >= {"fortunes", "wisdom"}


@pytest.mark.skipif(not HAS_WORDNET, reason="Debian wordnet-base not installed (apt-get install wordnet-base)")
def test_installed_wordnet():
    docs = dm.domain_documents(["glosses"], max_docs_per_domain=30)["glosses"]
    assert len(docs) == 30 and all(": " in d.text for d in docs)
    assert any(d.source.startswith("noun.") for d in dm.glosses_documents())
