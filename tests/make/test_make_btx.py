"""BTX: the mixed model's experts are the branches' FFNs and the rest their average (checked against a hand
computation, with and without a shared expert), untrained branches give back the dense model, trained branches are
the ones a separate run trains, the hidden-state router sends each domain to its branch, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from make_families import TEXT, dense_model, perturbed_branches, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.btx import btx, mix
from moekit.make.finetune import Finetune, finetune_model


@pytest.mark.parametrize("model_type", ["qwen3", "deepseek_v3"])
def test_mix_takes_the_branches_ffns_and_averages_the_rest(model_type):
    model = dense_model(model_type)
    branches = perturbed_branches(model)
    moe, plan = mix(branches, k=2, router="random")
    assert plan["experts"] == 2 and plan["partition"] == "btx"
    attn = [n for n, _ in model.named_parameters() if "self_attn" in n][0]
    mean = (dict(branches[0].named_parameters())[attn] + dict(branches[1].named_parameters())[attn]) / 2
    assert torch.allclose(dict(moe.named_parameters())[attn], mean, atol=1e-7)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        block = moe.model.layers[1].mlp
        ffns = [b.model.layers[1].mlp(x) for b in branches]
        logits = x.view(6, 32) @ block.gate.weight.t()
        if model_type == "deepseek_v3":  # shared = the averaged FFN, half; routed half by the normalised sigmoids
            p = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
            avg = copy.deepcopy(branches[0].model.layers[1].mlp)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(avg, name).weight.copy_((getattr(branches[0].model.layers[1].mlp, name).weight
                                                 + getattr(branches[1].model.layers[1].mlp, name).weight) / 2)
            want = 0.5 * avg(x) + 0.5 * sum(p[:, d, None].view(1, 6, 1) * ffns[d] for d in range(2))
        else:
            p = torch.softmax(logits, -1)
            want = sum(p[:, d, None].view(1, 6, 1) * ffns[d] for d in range(2))
        assert torch.allclose(block(x), want, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3", "deepseek_v3"])
def test_untrained_branches_give_back_the_dense_model(model_type):
    model = dense_model(model_type)
    ids = torch.randint(0, 100, (2, 9))
    tokens = [torch.randint(0, 100, (60,)) for _ in range(3)]
    moe, plan = btx(model, tokens, k=2, settings=Finetune(steps=0), router="random", progress=False)
    assert plan["branch_steps"] == [0, 0, 0]
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, model(ids).logits, atol=1e-5)


def test_trained_branches_are_the_separately_trained_models():
    model = dense_model("qwen3")
    tokens = [torch.randint(0, 50, (80,)), torch.randint(50, 100, (80,))]
    settings = Finetune(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup=1)
    moe, plan = btx(model, tokens, k=1, settings=settings, router="random", progress=False)
    assert plan["branch_steps"] == [3, 3]
    alone = copy.deepcopy(model)
    finetune_model(alone, tokens[1], Finetune(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup=1, seed=1),
                   progress=False)
    mlp = alone.model.layers[0].mlp
    experts = moe.model.layers[0].mlp.experts
    assert torch.allclose(experts.gate_up_proj[1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), atol=1e-6)
    assert not torch.allclose(experts.gate_up_proj[0], experts.gate_up_proj[1], atol=1e-4)


def test_hidden_router_sends_each_domain_to_its_branch():
    """Planted: the token embeddings of the two domains' vocabularies lie on either side of one direction."""
    model = dense_model("qwen3")
    g = torch.Generator().manual_seed(3)
    v = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0) * 0.1
    with torch.no_grad():
        model.model.embed_tokens.weight[:50] += v
        model.model.embed_tokens.weight[50:] -= v
    windows = [[torch.randint(0, 50, (40,), generator=g)], [torch.randint(50, 100, (40,), generator=g)]]
    moe, _ = btx(model, [w[0] for w in windows], k=1, settings=Finetune(steps=0), windows=windows, progress=False)
    seen = []
    handle = moe.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: seen.append(out[2]))
    with torch.no_grad():
        for d, ids in enumerate((torch.randint(0, 50, (1, 30), generator=g), torch.randint(50, 100, (1, 30),
                                                                                           generator=g))):
            moe(ids)
            assert float((seen[-1][:, 0] == d).float().mean()) > 0.9
    handle.remove()


def test_mix_refusals():
    model = dense_model("qwen3")
    with pytest.raises(ConfigError, match="expected at least 2 domains"):
        mix([model], k=1)
    with pytest.raises(ConfigError, match="router=hidden: expected the calibration windows"):
        mix([model, model], k=1)


def test_cli_btx(tmp_path, capsys):
    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense_model("qwen2", vocab=vocab).save_pretrained(src)
    a, b = tmp_path / "code.txt", tmp_path / "prose.txt"
    a.write_text("def f(x):\n    return x * 2\n" * 30)
    b.write_text(TEXT * 10)
    out = tmp_path / "btx"
    assert main(["make", str(src), "--method", "btx", "--data", str(a), "--data", str(b), "--k", "1", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["partition"] == "btx" and summary["domains"] == ["code", "prose"] and summary["experts"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM" and loaded.config.num_experts == 2
    capsys.readouterr()
    assert main(["make", str(src), "--method", "btx", "--data", str(a), "--k", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected --data with at least 2 domains" in err[0] and not (tmp_path / "x").exists()
