"""Training one PEFT LoRA per domain (library and `moekit lora train`), `moekit lora mix`, and the CLI's one-line
errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from conftest import QWEN_TARGETS, dense_lm, moe_lm, save_random_adapter
from moekit.cli.main import main
from moekit.compose import LoraMoE, read_adapter, train_domain_lora
from moekit.compose.adapters import INIT_RULE
from moekit.compose.domains import FORTUNES_DIR
from moekit.files import FileError

IDS = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 61]])
HAS_FORTUNES = Path(FORTUNES_DIR).is_dir()


def _error_line(err: str) -> str:
    """The error: one line, the last on stderr (transformers' weight-loading bar may come before it), no traceback."""
    assert "Traceback" not in err and err.endswith("\n")
    return err.rstrip("\n").split("\n")[-1]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_train_domain_lora_saves_a_peft_adapter(tmp_path):
    model = dense_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    summary = train_domain_lora(model, "toy", tmp_path / "a", steps=15, windows=windows, valid=windows[:1],
                                rank=4, lr=1e-2, batch_size=2, progress=False)
    assert summary["last_loss"] < summary["first_loss"]  # one window repeated: 15 steps at lr 1e-2 must fit it
    assert summary["valid_ppl_after"] < summary["valid_ppl_before"]
    assert summary["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
    assert model.state_dict().keys() == before.keys()  # unwrapped again, base weights untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    loaded = PeftModel.from_pretrained(dense_lm(), str(tmp_path / "a")).eval()
    assert not torch.allclose(_logits(loaded), _logits(dense_lm()), atol=1e-4)
    assert read_adapter(tmp_path / "a").rank == 4
    assert json.loads((tmp_path / "a" / "lora_summary.json").read_text())["steps"] == 15
    adapter = read_adapter(tmp_path / "a")  # the init record regenerates the A training started from
    assert adapter.init == {"rule": INIT_RULE, "seed": 0}
    for module, (a, _, _) in adapter.modules().items():
        a0 = adapter.a_init(module, tuple(a.shape))
        assert 0 < float((a - a0).norm()) < 0.5 * float(a0.norm())  # 15 small steps away, not an unrelated draw


def test_train_domain_lora_on_fused_expert_parameters(tmp_path):
    windows = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    summary = train_domain_lora(moe_lm(), "toy", tmp_path / "m", steps=2, windows=windows, expert_params=True,
                                rank=2, batch_size=2, progress=False)
    assert summary["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    loaded = PeftModel.from_pretrained(moe_lm(), str(tmp_path / "m")).eval()
    trained = {n for n, _ in loaded.named_parameters() if "lora_" in n}
    assert any(".experts." in n for n in trained) and any("q_proj" in n for n in trained)


@pytest.mark.skipif(not HAS_FORTUNES, reason="Debian fortunes not installed (apt-get install fortunes)")
def test_cli_train_then_mix(dense_dir, tmp_path, capsys):
    out = tmp_path / "fortunes"
    assert main(["lora", "train", str(dense_dir), "--domain", "fortunes", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--rank", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domain"] == "fortunes" and summary["base"] == str(dense_dir)
    assert (out / "adapter_model.safetensors").is_file() and summary["valid_ppl_after"] > 0
    other = tmp_path / "code"
    assert main(["lora", "train", str(dense_dir), "--domain", "code", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--rank", "2", "--out", str(other), "--json"]) == 0
    capsys.readouterr()
    mix = tmp_path / "mix"
    assert main(["lora", "mix", str(dense_dir), "--adapters", str(out), str(other), "--router", "dynmole",
                 "--domains", "fortunes,code", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--modules", "o_proj,q_a_proj", "--out", str(mix), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 4  # two of the five attention projections, in two layers
    assert set(summary["valid_ppl"]) == {"fortunes", "code"} and 0.0 <= summary["routing_accuracy"] <= 1.0
    from moekit.compose.adapters import load_base

    model = load_base(dense_dir)[1]
    assert LoraMoE.load(model, mix).spec["rule"]["name"] == "dynmole"


@pytest.mark.skipif(not HAS_FORTUNES, reason="Debian fortunes not installed (apt-get install fortunes)")
def test_cli_expert_params_on_an_moe_checkpoint(moe_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["lora", "train", str(moe_dir), "--domain", "fortunes", "--expert-params", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert main(["lora", "mix", str(moe_dir), "--adapters", str(out), str(out), "--router", "soft",
                 "--out", str(tmp_path / "mix"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 2 * (len(QWEN_TARGETS) + 1)  # attention projections and the experts, 2 layers
    from moekit.compose.adapters import load_base

    mix = LoraMoE.load(load_base(moe_dir)[1], tmp_path / "mix")
    assert sum(name.endswith(".experts") for name in mix.layers) == 2
    for kind, extra in (("mora", ["--budget", "2"]), ("hydra", ["--seq-rank", "2"])):  # the variants on experts
        assert main(["lora", "mix", str(moe_dir), "--adapters", str(out), str(out), "--kind", kind, *extra,
                     "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / kind)]) == 0
        capsys.readouterr()
        mix = LoraMoE.load(load_base(moe_dir)[1], tmp_path / kind)
        experts = [m for name, m in mix.layers.items() if name.endswith(".experts")]
        assert len(experts) == 2
        assert all(m.budget == 2 for m in experts) if kind == "mora" else all(len(m.seq_a) == 2 for m in experts)


@pytest.fixture(scope="module")
def pools(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pools")
    vocab = len(tokenizer)
    return {"a": save_random_adapter(dense_lm(vocab_size=vocab), root / "a", seed=1),
            "b": save_random_adapter(dense_lm(vocab_size=vocab), root / "b", seed=2),
            "r8": save_random_adapter(dense_lm(vocab_size=vocab), root / "r8", seed=3, r=8),
            "moe": save_random_adapter(moe_lm(vocab_size=vocab), root / "moe", seed=4, targets=QWEN_TARGETS)}


@pytest.mark.parametrize("args, message", [
    (["--adapters"], "adapter pool is empty"),
    (["--adapters", "{a}", "--router", "sparsest"], "--router 'sparsest' does not exist"),
    (["--adapters", "{a}", "{r8}"], "rank r=8"),
    (["--adapters", "{moe}", "{a}"], "does not exist in the base model"),
    (["--adapters", "{a}", "{b}", "--domains", "code"], "1 domains for 2 adapters"),
    (["--adapters", "{a}", "--kind", "soup"], "--kind 'soup' does not exist"),
])
def test_cli_mix_bad_input_is_one_line_exit_2(dense_dir, pools, tmp_path, capsys, args, message):
    args = [a.format(**pools) for a in args]
    assert main(["lora", "mix", str(dense_dir), *args, "--out", str(tmp_path / "out")]) == 2
    last = _error_line(capsys.readouterr().err)
    assert last.startswith("moekit lora: error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_cli_train_bad_input_is_one_line_exit_2(dense_dir, tmp_path, capsys):
    assert main(["lora", "train", str(dense_dir), "--domain", "poetry", "--out", str(tmp_path / "o")]) == 2
    assert "domain 'poetry' does not exist" in _error_line(capsys.readouterr().err)
    assert main(["lora", "train", str(dense_dir), "--domain", "code", "--out", str(dense_dir)]) == 2
    assert _error_line(capsys.readouterr().err).startswith("moekit lora: error: ")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["lora", "train", str(dense_dir), "--domain", "code", "--out", str(busy)]) == 2
    assert "exists and is not empty" in _error_line(capsys.readouterr().err)
    assert (busy / "notes.txt").read_text() == "mine"


def test_force_replaces_a_previous_adapter(tmp_path):
    windows = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    train_domain_lora(dense_lm(), "toy", tmp_path / "a", steps=1, windows=windows, rank=2, progress=False)
    with pytest.raises(FileError, match="exists and is not empty"):
        train_domain_lora(dense_lm(), "toy", tmp_path / "a", steps=1, windows=windows, rank=4, progress=False)
    train_domain_lora(dense_lm(), "toy", tmp_path / "a", steps=1, windows=windows, rank=4, progress=False,
                      force=True)
    assert read_adapter(tmp_path / "a").rank == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left beside it


def test_subcommands_register_into_the_lora_group(capsys):
    import moekit.cli.lora as lora_cli

    calls = []
    lora_cli.register("echo-test", "test only", lambda p: p.add_argument("--word"),
                      lambda args: calls.append(args.word) or 0)
    try:
        assert main(["lora", "echo-test", "--word", "hi"]) == 0
    finally:
        del lora_cli._SUBCOMMANDS["echo-test"]
    assert calls == ["hi"]
    with pytest.raises(SystemExit) as exit_info:
        main(["lora", "echo-test"])
    assert exit_info.value.code == 2  # gone again: argparse refuses the unknown subcommand
    capsys.readouterr()
