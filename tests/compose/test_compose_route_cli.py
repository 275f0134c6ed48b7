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


def test_kshot_selects_the_adapter_trained_on_the_kshot_text(tmp_path, capsys, dense_dir, tokenizer):
    """A pool of a random adapter (twice) and one trained on the K-shot text: the trained one has the lower K-shot
    loss and is picked first; the similarity of the duplicate pair is 1."""
    from moekit.compose.lora import train_domain_lora
    from moekit.data import encode

    text = "the cat sat on the mat and the dog sat on the log. " * 6
    kshot = write_jsonl(tmp_path / "k.jsonl", [text], ["k"])
    model = dense_lm_for(dense_dir)
    windows = __import__("torch").tensor([encode(tokenizer, text)[:24]] * 4)
    train_domain_lora(model, "k", tmp_path / "good", steps=15, windows=windows, rank=4, alpha=8, lr=5e-3,
                      batch_size=4, target_modules=["o_proj"], progress=False)
    from compose.conftest import save_random_adapter

    save_random_adapter(dense_lm_for(dense_dir), tmp_path / "rand", seed=1, targets=["o_proj"], alpha=0.5)
    code, out, err = run(["route", "kshot", str(tmp_path / "rand"), str(tmp_path / "good"), str(tmp_path / "rand"),
                          "--data", str(kshot), "--model", str(dense_dir), "--m", "2"], capsys)
    assert code == 0, err
    result = json.loads(out)
    nll = result["nll"]
    assert nll[str(tmp_path / "good")] < nll[str(tmp_path / "rand")]
    assert result["selected"][0] == str(tmp_path / "good") and len(set(result["selected"])) == 2
    assert abs(result["similarity"][0][2] - 1) < 1e-5
    code, _, err = run(["route", "kshot", "--data", str(kshot), "--model", str(dense_dir)], capsys)
    assert code == 2 and "empty adapter pool" in err
    code, _, err = run(["route", "kshot", str(tmp_path / "good"), "--data", str(kshot), "--model", str(dense_dir),
                        "--m", "3"], capsys)
    assert code == 2 and "--m 3: expected 1 <= m <= 1" in err


def dense_lm_for(path):
    from compose.conftest import dense_lm

    return dense_lm(vocab_size=json.loads((path / "config.json").read_text())["vocab_size"])
