"""`moekit train` from a checkpoint (Recipe.init_from) and with a LoRA-MoE over saved PEFT adapters
(Recipe.lora_moe): the loaded checkpoint is what trains, a forced-one-expert mixture is that adapter, the rules'
aux losses are logged, the output loads again, and bad recipe fields are one-line errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from hf.tiny import tiny_model
from moekit.errors import ConfigError
from moekit.train.init_from import token_stream, train_texts
from moekit.train.tokenizer import load_tokenizer
from moekit.train.trainer import Recipe, batch_at, load_run, train
from moekit.train.validate import check_recipe
from threads import one_thread  # noqa: F401  (autouse: one thread)

IDS = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 61], [1, 7, 7, 30, 12, 90, 4, 4]])
TARGETS = ["q_a_proj", "o_proj"]


def base_lm(vocab_size: int) -> torch.nn.Module:
    return tiny_model("deepseek_v3", seed=0, num_hidden_layers=2, first_k_dense_replace=2, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny dense DeepSeek-V3 saved with the default model's tokenizer, and two random LoRA adapters on it."""
    from moekit.default import default_model_path

    src = default_model_path()
    root = tmp_path_factory.mktemp("init")
    vocab = load_tokenizer(src).get_vocab_size()
    base_lm(vocab).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, root / "base" / name)
    adapters = []
    for i in range(2):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(base_lm(vocab), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False))
        peft_model.save_pretrained(root / f"a{i}")
        adapters.append(str(root / f"a{i}"))
    return root / "base", adapters, vocab


def recipe(ckpt, **kw) -> Recipe:
    return Recipe("ft", init_from=str(ckpt[0]), **{**dict(seq_len=16, batch_size=2, steps=1, warmup=1,
                                                          max_docs_per_domain=3), **kw})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def checkpoint_model(ckpt) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt[0], dtype=torch.float32).eval()


def test_zero_steps_saves_the_checkpoint_as_it_was(ckpt, tmp_path):
    train(recipe(ckpt, steps=0), tmp_path / "run", progress=False)
    assert torch.equal(logits(load_run(tmp_path / "run")), logits(checkpoint_model(ckpt)))
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["recipe"]["init_from"] == str(ckpt[0]) and "lora_moe" not in state["recipe"]


def test_one_step_starts_from_the_checkpoint(ckpt, tmp_path):
    r = recipe(ckpt)
    recs = train(r, tmp_path / "run", progress=False)
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    tokens, _ = token_stream(tok, 0, *train_texts(r, r.seed))
    batch = batch_at(tokens, r, 0, 0)
    with torch.no_grad():
        expected = float(checkpoint_model(ckpt)(input_ids=batch, labels=batch).loss)
    assert recs[0]["lm_loss"] == pytest.approx(expected, abs=1e-5)  # the first step's loss is the checkpoint's
    assert not torch.equal(logits(load_run(tmp_path / "run")), logits(checkpoint_model(ckpt)))  # and it trained


def test_forced_one_expert_mixture_is_that_peft_adapter(ckpt, tmp_path):
    spec = {"adapters": ckpt[1], "rule": "fixed", "expert": 1}
    train(recipe(ckpt, lora_moe=spec, steps=0), tmp_path / "run", progress=False)
    assert {p.name for p in (tmp_path / "run" / "model").iterdir()} == {"mixture.json", "mixture.safetensors"}
    expected = logits(PeftModel.from_pretrained(checkpoint_model(ckpt), ckpt[1][1]).eval())
    assert not torch.allclose(expected, logits(checkpoint_model(ckpt)), atol=1e-3)
    assert torch.allclose(logits(load_run(tmp_path / "run")), expected, atol=2e-5, rtol=1e-5)


def test_topk_mixture_trains_routers_only_and_logs_aux(ckpt, tmp_path):
    spec = {"adapters": ckpt[1], "rule": "topk", "k": 1, "aux_weight": 0.5}
    recs = train(recipe(ckpt, lora_moe=spec, lr=1e-2, steps=2), tmp_path / "run", progress=False)
    for rec in recs:
        assert rec["aux_balance"][0] > 0
        assert rec["loss"] == pytest.approx(rec["lm_loss"] + 0.5 * rec["aux_balance"][0], abs=1e-4)
    saved = load_file(tmp_path / "run" / "model" / "mixture.safetensors")
    adapter = load_file(f"{ckpt[1][0]}/adapter_model.safetensors")
    name = "model.layers.0.self_attn.o_proj"
    assert torch.equal(saved[f"{name}.pool.a"][0], adapter[f"base_model.model.{name}.lora_A.weight"])
    ckpt_state = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert torch.equal(ckpt_state[f"{name}.base.weight"], checkpoint_model(ckpt).get_submodule(name).weight)
    from moekit.compose.lora_moe import LoraMoE

    fresh = LoraMoE.from_adapters(checkpoint_model(ckpt), ckpt[1], router="topk", k=1)
    assert not torch.equal(saved[f"{name}.router.weight"], fresh.layers[name].router.weight)  # the router trained


def test_recipe_field_errors(ckpt, tmp_path):
    good = recipe(ckpt, lora_moe={"adapters": ckpt[1]})
    check_recipe(good)
    bad = [(replace(good, init_from=None), "lora_moe needs init_from"),
           (replace(good, init_from=str(tmp_path)), "init_from="),
           (replace(good, lora_moe={"adapters": []}), "lora_moe.adapters"),
           (replace(good, lora_moe={"adapters": ckpt[1], "rule": "nope"}), "lora_moe.rule"),
           (replace(good, lora_moe={"adapters": ckpt[1], "size": 3}), "unknown key(s) size"),
           (replace(good, lora_moe={"adapters": ckpt[1], "domains": ["prose"]}), "lora_moe.domains"),
           (replace(good, lora_moe={"adapters": ckpt[1], "k": 0}), "lora_moe.k"),
           (replace(good, lora_moe={"adapters": ckpt[1], "rule": "fixed"}), "trains nothing"),
           (replace(good, moe_layer={}), "moe_layer with init_from"),
           (replace(good, lora_moe=None, init_from=None, model={"model_type": "llama"}, steps=0), "steps=0")]
    for r, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            check_recipe(r)
        assert "\n" not in str(err.value)


def test_cli_config_runs_a_lora_moe(ckpt, tmp_path, capsys):
    from moekit.cli.main import main

    cfg = tmp_path / "mix.json"
    cfg.write_text(json.dumps({"init_from": str(ckpt[0]), "lora_moe": {"adapters": ckpt[1], "rule": "soft"},
                               "steps": 1, "warmup": 1, "seq_len": 16, "batch_size": 2, "max_docs_per_domain": 3}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    spec = json.loads((tmp_path / "run" / "model" / "mixture.json").read_text())
    assert spec["rule"]["name"] == "soft" and spec["adapters"] == ckpt[1] and spec["recipe"]["name"] == "mix"
    cfg.write_text(json.dumps({"model": {"model_type": "llama"}, "lora_moe": {"adapters": ckpt[1]}}))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "lora_moe needs init_from" in err and len(err.strip().splitlines()) == 1


def test_lora_moe_run_resumes_bit_for_bit(ckpt, tmp_path):
    r = recipe(ckpt, lora_moe={"adapters": ckpt[1], "rule": "dynmole"}, lr=1e-2, steps=2)
    first = train(r, tmp_path / "parts", stop_at=1, progress=False)
    rest = train(r, tmp_path / "parts", resume=True, progress=False)
    whole = train(r, tmp_path / "whole", progress=False)
    assert [x["loss"] for x in first + rest] == [x["loss"] for x in whole] and "aux_tsallis" in whole[0]
    a, b = (load_file(tmp_path / d / "model" / "mixture.safetensors") for d in ("parts", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
