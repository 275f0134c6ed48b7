from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.errors import ConfigError, MoekitError
from moekit.train import build_corpus, load_tokenizer, save_tokenizer, train_tokenizer
from moekit.train import corpus as corpus_mod
from moekit.train.corpus import SPLITS, Corpus, split_of
from moekit.train.tokenizer import EOS_TOKEN, PAD_TOKEN


def _write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    prose = {
        f"library/mod{i:03d}.rst.txt": f"Module {i}\n=========\n\nThe module number {i} does things.\n"
        for i in range(300)
    }
    prose["notes.txt"] = "not a reST source, ignored"
    prose["library/blank.rst.txt"] = "  \n\n"
    code = {f"pkg{i % 7}/m{i:03d}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(300)}
    code["test/test_skipped.py"] = "def test_x():\n    pass\n"
    code["pkg0/tests/test_also_skipped.py"] = "pass\n"
    code["site-packages/thirdparty.py"] = "import os\n"
    code["pkg1/latin1.py"] = "# caf\xe9\n".encode("latin-1")
    return _write_tree(tmp_path / "prose", prose), _write_tree(tmp_path / "code", code)


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    return build_corpus(max_docs_per_domain=30)


@pytest.fixture(scope="module")
def tok(small_corpus: Corpus):
    return train_tokenizer(small_corpus, vocab_size=512)


def test_splits_disjoint_and_covering(dirs: tuple[Path, Path]) -> None:
    c = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]))
    keys = {name: [(d.domain, d.source) for d in c.split(name)] for name in SPLITS}
    all_keys = [(d.domain, d.source) for d in c.documents]
    assert len(all_keys) == 600 and len(set(all_keys)) == 600
    assert sum(len(v) for v in keys.values()) == len(all_keys)
    assert set().union(*map(set, keys.values())) == set(all_keys)
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not set(keys[a]) & set(keys[b])
    assert 0.85 < len(keys["train"]) / 600 < 0.95  # 90/5/5 by hash bucket
    assert keys["validation"] and keys["test"]
    for name in SPLITS:  # every document sits in the split its hash names
        assert all(split_of(domain, source, c.seed) == name for domain, source in keys[name])
    assert all_keys == sorted(all_keys)


def test_code_dir_skips_tests_site_packages_and_undecodable(dirs: tuple[Path, Path]) -> None:
    c = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]))
    code = {d.source for d in c.documents if d.domain == "code"}
    prose = {d.source for d in c.documents if d.domain == "prose"}
    assert len(code) == 300 and all(s.startswith("pkg") and s.endswith(".py") for s in code)
    assert "pkg1/latin1.py" not in code and "pkg0/m000.py" in code
    assert len(prose) == 300 and "notes.txt" not in prose and "library/blank.rst.txt" not in prose
    assert c.prose_source == "python3.11-doc"


def test_deterministic_across_builds(dirs: tuple[Path, Path]) -> None:
    a = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]), max_docs_per_domain=100, seed=3)
    b = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]), max_docs_per_domain=100, seed=3)
    assert a.documents == b.documents and len(a.documents) == 200
    for name in SPLITS:
        assert a.split(name) == b.split(name)
    other = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]), max_docs_per_domain=100, seed=4)
    assert {d.source for d in other.documents} != {d.source for d in a.documents}  # the seed picks the subset


def test_split_hash_is_stable_and_salted_by_seed() -> None:
    # sha1, not Python's randomised hash: these values were recorded once and hold on every machine and run
    code = "tvtttttttttttttttttttttttttttttttttttttttttttttttttttttttttt"
    prose_seed7 = "ttttttttttttttttttttttttttttttttttttttttttttvttttvvttttttttt"
    assert "".join(split_of("code", f"pkg/m{i}.py")[0] for i in range(60)) == code
    assert "".join(split_of("prose", f"topic{i}", seed=7)[0] for i in range(60)) == prose_seed7
    sources = [f"x/{i}.py" for i in range(200)]
    assert [split_of("code", s, 0) for s in sources] != [split_of("code", s, 1) for s in sources]
    assert [split_of("code", s, 0) for s in sources] != [split_of("prose", s, 0) for s in sources]


def test_adding_a_document_keeps_other_splits(dirs: tuple[Path, Path]) -> None:
    before = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]))
    (dirs[1] / "pkg3" / "new_module.py").write_text("VALUE = 1\n", encoding="utf-8")
    after = build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]))
    assert len(after.documents) == len(before.documents) + 1
    split_before = {(d.domain, d.source): name for name in SPLITS for d in before.split(name)}
    split_after = {(d.domain, d.source): name for name in SPLITS for d in after.split(name)}
    assert ("code", "pkg3/new_module.py") in split_after
    assert all(split_after[key] == name for key, name in split_before.items())


def test_default_corpus_has_both_domains_labelled(small_corpus: Corpus) -> None:
    assert small_corpus.domains() == ["code", "prose"]
    by_domain = {d: [doc for doc in small_corpus.documents if doc.domain == d] for d in ("code", "prose")}
    assert len(by_domain["code"]) == 30 and len(by_domain["prose"]) == 30
    for doc in by_domain["code"]:
        parts = doc.source.split("/")
        assert doc.source.endswith(".py") and not {"test", "tests", "site-packages"} & set(parts)
        assert doc.text.strip()
    if small_corpus.prose_source == "pydoc_data":
        assert all(topics[doc.source] == doc.text for doc in by_domain["prose"])
    else:
        assert all(doc.source.endswith(".rst.txt") for doc in by_domain["prose"])


def test_falls_back_to_pydoc_data_without_doc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _write_tree(tmp_path / "code", {"a.py": "x = 1\n"})
    monkeypatch.setattr(corpus_mod, "DEFAULT_PROSE_DIR", str(tmp_path / "no-such-dir"))
    c = build_corpus(code_dir=str(code))
    prose = [d for d in c.documents if d.domain == "prose"]
    assert c.prose_source == "pydoc_data"
    assert {d.source for d in prose} == {k for k, v in topics.items() if v.strip()}
    monkeypatch.setattr(corpus_mod, "DEFAULT_PROSE_DIR", str(_write_tree(tmp_path / "doc", {"x.rst.txt": "Hi\n"})))
    c = build_corpus(code_dir=str(code))
    assert c.prose_source == "python3.11-doc"
    assert [(d.domain, d.source, d.text) for d in c.documents if d.domain == "prose"] == [
        ("prose", "x.rst.txt", "Hi\n")
    ]


@pytest.mark.parametrize("which", ["prose", "code"])
def test_bad_directory_raises_config_error(tmp_path: Path, which: str) -> None:
    good = _write_tree(tmp_path / "good", {"a.rst.txt": "text\n", "b.py": "x = 1\n"})
    missing = tmp_path / "missing"
    empty = _write_tree(tmp_path / "empty", {"only.bin": b"\xff\xfe", "bad.py": b"\xff\xfe", "bad.rst.txt": b"\xff"})
    for bad in (missing, empty):
        kwargs = {"prose_dir": str(good), "code_dir": str(good), which + "_dir": str(bad)}
        with pytest.raises(ConfigError) as info:
            build_corpus(**kwargs)
        message = str(info.value)
        assert isinstance(info.value, MoekitError) and str(bad) in message and "\n" not in message
        assert "expected" in message


def test_bad_arguments(small_corpus: Corpus) -> None:
    with pytest.raises(ConfigError, match="split 'dev'"):
        small_corpus.split("dev")
    with pytest.raises(ConfigError, match="max_docs_per_domain"):
        build_corpus(max_docs_per_domain=0)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(small_corpus, vocab_size=100)


def test_progress_goes_to_stderr(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    build_corpus(prose_dir=str(dirs[0]), code_dir=str(dirs[1]))
    out, err = capsys.readouterr()
    assert out == "" and "corpus code" in err and "corpus prose" in err


def test_tokenizer_learns_merges_and_specials(tok, small_corpus: Corpus) -> None:
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(EOS_TOKEN) == 0 and tok.token_to_id(PAD_TOKEN) == 1
    sample = next(small_corpus.texts("train", domain="code"))
    assert len(tok.encode(sample).ids) < 0.8 * len(sample.encode())  # 254 merges already compress real code
    again = train_tokenizer(small_corpus, vocab_size=512)
    assert again.get_vocab() == tok.get_vocab()


@given(st.text())
def test_tokenizer_round_trip(tok, text: str) -> None:
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_saved_tokenizer_loads_in_transformers(tok, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    auto = AutoTokenizer.from_pretrained(str(out))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert auto.eos_token == EOS_TOKEN and auto.pad_token_id == 1
    texts = ["def f(x):\n    return x  # ok\n", "The module  does things.", "naïve 日本語 🎉\t<|endoftext|>"]
    for text in texts:
        ids = tok.encode(text).ids
        assert auto(text)["input_ids"] == ids and fast(text)["input_ids"] == ids
        assert auto.decode(ids, skip_special_tokens=False) == text
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    save_tokenizer(tok, out)  # overwriting an existing save works and leaves no temp files
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")
