"""`moekit route fit/apply`: JSON out, routing accuracy on planted documents; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest

from compose.conftest import moe_lm
from compose.test_compose_compeft import saved_lora
from compose.test_compose_model_routing import planted
from moekit.cli.main import main


def write_jsonl(path, texts, labels=None):
    rows = [{"text": t, **({"domain": y} if labels else {})} for t, y in zip(texts, labels or texts, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("router", ["coe-tfidf", "glider-global"])
def test_fit_apply_planted(tmp_path, capsys, router):
    train = write_jsonl(tmp_path / "train.jsonl", *planted(60, seed=0))
    texts, labels = planted(30, seed=1)
    test = write_jsonl(tmp_path / "test.jsonl", texts, labels)
    code, out, err = run(["route", "fit", "--router", router, "--data", str(train), "--features", "tfidf",
                          "--out", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert json.loads(out)["categories"] == sorted(set(labels))
    code, out, err = run(["route", "apply", str(tmp_path / "r.json"), "--data", str(test)], capsys)
    result = json.loads(out)
    assert code == 0 and result["accuracy"] == 1.0
    assert [r["category"] for r in result["routes"]] == labels


def test_coe_hidden_with_expert_map(tmp_path, capsys, dense_dir):
    texts = [("0123 4567 89 " * 4) + str(i) for i in range(8)] + [("hello world again " * 3) + str(i) for i in range(8)]
    labels = ["digits"] * 8 + ["words"] * 8
    train = write_jsonl(tmp_path / "train.jsonl", texts[::2], labels[::2])
    test = write_jsonl(tmp_path / "test.jsonl", texts[1::2], labels[1::2])
    a, b = saved_lora(tmp_path / "a"), saved_lora(tmp_path / "b", seed=1)
    code, _, err = run(["route", "fit", "--router", "coe-hidden", "--data", str(train), "--model", str(dense_dir),
                        "--expert", f"digits={a}", "--expert", f"words={b}", "--out", str(tmp_path / "r.json")],
                       capsys)
    assert code == 0, err
    code, out, _ = run(["route", "apply", str(tmp_path / "r.json"), "--data", str(test), "--model", str(dense_dir)],
                       capsys)
    result = json.loads(out)
    assert result["accuracy"] == 1.0
    assert [r["expert"] for r in result["routes"]] == [str(a) if y == "digits" else str(b) for y in labels[1::2]]


def test_bad_input(tmp_path, capsys, dense_dir):
    from peft import LoraConfig, get_peft_model

    train = write_jsonl(tmp_path / "train.jsonl", *planted(12, seed=0))
    unlabelled = write_jsonl(tmp_path / "u.jsonl", ["some text", "more text"])
    get_peft_model(moe_lm(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "q")
    cases = [
        (["route", "fit", "--router", "knn", "--data", str(train), "--out", str(tmp_path / "r.json")],
         "--router knn: unknown router"),
        (["route", "fit", "--router", "coe-tfidf", "--data", str(unlabelled), "--out", str(tmp_path / "r.json")],
         "no domain; expected every training document labelled"),
        (["route", "fit", "--router", "coe-tfidf", "--data", str(train), "--expert", "py",
          "--out", str(tmp_path / "r.json")], "--expert py: expected CATEGORY=ADAPTER_DIR"),
        (["route", "fit", "--router", "coe-tfidf", "--data", str(train), "--model", str(dense_dir),
          "--expert", f"py={tmp_path / 'q'}", "--out", str(tmp_path / "r.json")],
         "expected an adapter trained on this base model"),
        (["route", "fit", "--router", "coe-tfidf", "--data", str(train), "--out", str(train)], "is the input"),
        (["route", "apply", str(train), "--data", str(train)], "expected the JSON written by moekit route fit"),
    ]
    capsys.readouterr()  # transformers' warnings while the fixtures were built
    for argv, message in cases:
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err, (argv, err)
        lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]  # transformers' bar
        assert len(lines) == 1 and lines[0].startswith("moekit route: error: ") and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
