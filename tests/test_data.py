"""moekit.data: data files read into documents, cut into windows, bad files refused with one line."""

from __future__ import annotations

import json

import pytest

from moekit.data import DataError, TextDoc, default_documents, encode, read_documents, windows


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):  # noqa: ARG002 (the transformers signature)
        return [ord(c) for c in text]


def test_jsonl_and_text_files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"text": "x = 1", "domain": "code"}) + "\n\n" + json.dumps({"text": "hi", "task": "qa"})
                 + "\n")
    b = tmp_path / "notes.txt"
    b.write_text("plain prose")
    docs = read_documents([a, b])
    assert [(d.text, d.domain) for d in docs] == [("x = 1", "code"), ("hi", "qa"), ("plain prose", "notes")]
    assert docs[0].source == "a.jsonl:1"


@pytest.mark.parametrize("content, message", [
    (b"", "no text"),
    (b"\x00\x01\x02binary", "binary"),
    (b"\xff\xfe bad", "not UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "d.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        read_documents([p])
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_bad_jsonl_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'text'"):
        read_documents([p])
    with pytest.raises(DataError, match="cannot read"):
        read_documents([tmp_path / "missing.txt"])


def test_windows_cut_long_documents_and_keep_every_token():
    docs = [TextDoc("abcdefg", "p", "1"), TextDoc("xy", "c", "2")]
    ws = windows(CharTokenizer(), docs, seq_len=3)
    assert [w.ids.tolist() for w in ws] == [[97, 98, 99], [100, 101, 102], [103, 0], [120, 121, 0]]
    assert [(w.doc, w.domain, w.start) for w in ws] == [(0, "p", 0), (0, "p", 3), (0, "p", 6), (1, "c", 0)]
    capped = windows(CharTokenizer(), docs, seq_len=3, max_tokens=4)
    assert sum(len(w.ids) for w in capped) == 4
    assert encode(CharTokenizer(), "a") == [97, 0]


def test_default_documents_have_both_domains():
    docs = default_documents()
    assert {d.domain for d in docs} == {"prose", "code"}
