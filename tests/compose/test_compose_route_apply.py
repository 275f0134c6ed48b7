"""`moekit route apply` with Glider's per-token local routing and with a P-Adapter: JSON rows against the Python API
computed here, the global prior deciding when strong; bad input exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compose.test_compose_compeft import saved_lora
from compose.test_compose_model_routing import WORDS, planted
from compose.test_compose_route_cli import run, write_jsonl
from moekit.compose.adapters import load_base, read_weights
from moekit.compose.glider import Glider
from moekit.compose.model_routing import load_router
from moekit.compose.p_adapters import PAdapter, PAdapterLM, save_p_adapter
from moekit.data import encode


def _fit_global(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", *planted(30, seed=0))
    code, _, err = run(["route", "fit", "--router", "glider-global", "--data", str(train), "--features", "tfidf",
                        "--out", str(tmp_path / "g.json")], capsys)
    assert code == 0, err
    return tmp_path / "g.json"


def test_glider_local_routing_from_the_cli(tmp_path, capsys, dense_dir, tokenizer):
    router_path = _fit_global(tmp_path, capsys)
    texts, labels = planted(6, seed=1)
    test = write_jsonl(tmp_path / "test.jsonl", texts, labels)
    adapters = {c: saved_lora(tmp_path / c, seed=i) for i, c in enumerate(WORDS)}
    flags = [x for c, a in adapters.items() for x in ("--adapter", f"{c}={a}")]
    code, out, err = run(["route", "apply", str(router_path), "--data", str(test), "--model", str(dense_dir),
                          "--alpha", "0", *flags], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "glider-local" and result["accuracy"] == 1.0  # the global router's choice
    # reference: Glider on the same model and adapters, the same global prior (alpha 0: local routing alone)
    router = load_router(router_path)
    _, model, _ = load_base(dense_dir)
    glider = Glider(model, [read_weights(adapters[e]) for e in router.experts], alpha=0.0, k=1)
    for row, text in zip(result["routes"], texts, strict=True):
        glider.set_global(router.scores([text])[0])
        with torch.no_grad():
            model(input_ids=torch.tensor([encode(tokenizer, text)[:256]]))
        w = torch.stack([layer.last_weights.mean(0) for layer in glider.layers.values()]).mean(0)
        assert np.allclose([row["local"][e] for e in router.experts], w.numpy(), atol=1e-5)
        assert abs(sum(row["local"].values()) - 1) < 1e-5
    # a strong global prior decides every token's expert: local routing follows the document's category
    code, out, err = run(["route", "apply", str(router_path), "--data", str(test), "--model", str(dense_dir),
                          "--alpha", "100", *flags], capsys)
    result = json.loads(out)
    assert code == 0 and result["local_accuracy"] == 1.0
    assert all(max(r["local"].values()) > 0.999 for r in result["routes"])


def test_p_adapter_from_the_cli(tmp_path, capsys, dense_dir, tokenizer):
    _, model, _ = load_base(dense_dir)
    g = torch.Generator().manual_seed(0)
    adapter = PAdapter({c: torch.randn(2, model.config.hidden_size, generator=g) for c in WORDS}, hidden=8)
    path = save_p_adapter(adapter, tmp_path / "pa.safetensors")
    texts, labels = planted(6, seed=1)
    test = write_jsonl(tmp_path / "test.jsonl", texts, labels)
    code, out, err = run(["route", "apply", str(path), "--data", str(test), "--model", str(dense_dir)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "p-adapter" and "accuracy" in result
    lm = PAdapterLM(model, adapter)
    rows = result["routes"]
    with torch.no_grad():
        for row, text in zip(rows, texts, strict=True):
            w = lm.route(torch.tensor([encode(tokenizer, text)[:256]]))[0]
            assert np.allclose([row["weights"][c] for c in WORDS], w.numpy(), atol=1e-5)
            assert row["category"] == list(WORDS)[int(w.argmax())]
    assert len({tuple(r["weights"].values()) for r in rows}) > 1  # the weights depend on the document


def test_bad_input(tmp_path, capsys, dense_dir):
    router_path = _fit_global(tmp_path, capsys)
    test = write_jsonl(tmp_path / "test.jsonl", *planted(3, seed=1))
    a = saved_lora(tmp_path / "a")
    coe = tmp_path / "coe.json"
    code, _, err = run(["route", "fit", "--router", "coe-tfidf", "--data", str(test), "--out", str(coe)], capsys)
    assert code == 0, err
    pa = save_p_adapter(PAdapter({"x": torch.zeros(2, 7), "y": torch.zeros(2, 7)}), tmp_path / "pa.safetensors")
    base = ["--data", str(test), "--model", str(dense_dir)]
    every = [x for c in WORDS for x in ("--adapter", f"{c}={a}")]
    cases = [
        (["route", "apply", str(router_path), *base, "--adapter", f"py={a}"], "expected one EXPERT=ADAPTER per expert"),
        (["route", "apply", str(router_path), *base, "--adapter", "py"], "--adapter py: expected EXPERT=ADAPTER_DIR"),
        (["route", "apply", str(coe), *base, "--adapter", f"py={a}"], "expected a glider-global router"),
        (["route", "apply", str(pa), *base], "expected the model's hidden size"),
        (["route", "apply", str(pa), *base, "--adapter", f"py={a}"], "expected --adapter only with a glider-global"),
        (["route", "apply", str(router_path), *base, "--max-tokens", "0"], "--max-tokens 0: expected a positive"),
        (["route", "apply", str(router_path), *base, "--k", "0", *every],
         "--k 0, --temperature 0.1: expected k >= 1"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]
        assert code == 2 and message in err, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("moekit route: error: ") and "Traceback" not in err


def test_fit_p_adapter_from_the_cli_then_apply(tmp_path, capsys, dense_dir):
    from moekit.compose.p_adapters import load_p_adapter

    texts, labels = planted(12, seed=0)
    train = write_jsonl(tmp_path / "train.jsonl", [t + " " + t for t in texts], labels)
    out = tmp_path / "pa.safetensors"
    code, text, err = run(["route", "fit", "--router", "p-adapter", "--data", str(train), "--model", str(dense_dir),
                           "--prompt-tokens", "2", "--steps", "2", "--seq-len", "8", "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads(text)
    assert result["categories"] == sorted(WORDS) and all(n >= 1 for n in result["windows"].values())
    adapter = load_p_adapter(out)
    assert adapter.names == sorted(WORDS) and adapter.prompts.shape[1] == 2
    code, text, err = run(["route", "apply", str(out), "--data", str(train), "--model", str(dense_dir)], capsys)
    assert code == 0, err
    assert json.loads(text)["documents"] == 12 and json.loads(text)["kind"] == "p-adapter"
    code, _, err = run(["route", "fit", "--router", "p-adapter", "--data", str(train), "--model", str(dense_dir),
                        "--seq-len", "100000", "--out", str(tmp_path / "b.safetensors")], capsys)
    assert code == 2 and "no window of 100000 tokens" in err and not (tmp_path / "b.safetensors").exists()


def test_glider_gates_saved_by_fit_and_used_by_apply(tmp_path, capsys, dense_dir, tokenizer):
    """route fit --gate-steps trains Glider's gates and writes them beside the router; route apply loads them (its
    local weights are those of a Glider with the same gates loaded here); the file round-trips exactly."""
    from safetensors.torch import load_file

    from moekit.errors import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", *planted(12, seed=0))
    adapters = {c: saved_lora(tmp_path / c, seed=i) for i, c in enumerate(WORDS)}
    experts = [x for c, a in adapters.items() for x in ("--expert", f"{c}={a}")]
    code, _, err = run(["route", "fit", "--router", "glider-global", "--data", str(train), "--features", "tfidf",
                        "--model", str(dense_dir), *experts, "--gate-steps", "2", "--seq-len", "8",
                        "--out", str(tmp_path / "g.json")], capsys)
    assert code == 0, err
    router = load_router(tmp_path / "g.json")
    gates_file = tmp_path / "g.gates.safetensors"
    assert router.gates == gates_file.name and set(router.adapters) == set(WORDS)
    saved = load_file(gates_file)
    _, model, _ = load_base(dense_dir)
    glider = Glider(model, [read_weights(router.adapters[e]) for e in router.experts], alpha=0.0, k=1)
    arrow = glider.gates()
    glider.load_gates(gates_file, router.experts)
    assert glider.gates().keys() == saved.keys() and all(torch.equal(glider.gates()[k], v) for k, v in saved.items())
    assert all(not torch.allclose(arrow[k], v) for k, v in saved.items())  # trained, not Arrow's prototypes
    assert all(layer.local == "gates" for layer in glider.layers.values())
    with pytest.raises(ConfigError, match="expected \\['b', 'a'"):
        glider.load_gates(gates_file, ["b", "a"])
    texts, labels = planted(3, seed=1)
    test = write_jsonl(tmp_path / "test.jsonl", texts, labels)
    code, out, err = run(["route", "apply", str(tmp_path / "g.json"), "--data", str(test), "--model", str(dense_dir),
                          "--alpha", "0"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "glider-local" and result["local_router"] == "gates"
    for row, text in zip(result["routes"], texts, strict=True):
        with torch.no_grad():
            model(input_ids=torch.tensor([encode(tokenizer, text)[:256]]))
        w = torch.stack([layer.last_weights.mean(0) for layer in glider.layers.values()]).mean(0)
        assert np.allclose([row["local"][e] for e in router.experts], w.numpy(), atol=1e-5)
    code, _, err = run(["route", "apply", str(tmp_path / "g.json"), "--data", str(test), "--model", str(dense_dir),
                        "--adapter", f"py={adapters['py']}"], capsys)
    assert code == 2 and "expected no --adapter" in err and len(err.strip().splitlines()) == 1
