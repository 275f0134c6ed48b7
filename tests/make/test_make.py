"""Dense -> MoE: partitions against hand-made and planted cases, routers on planted activations, conversion to
native families (equal to the dense model with every expert on), the CLI and its refusals."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit.hf as mh
import moekit.make as mk
from moekit.cli.main import main
from moekit.default import default_model_path
from moekit.errors import ConfigError
from moekit.make.convert import expert_tensors
from moekit.make.partition import balanced_kmeans, coactivation_partition, random_partition
from moekit.make.routers import activations, learned_router


def dense(model_type: str = "qwen3", dtype=torch.float32, vocab: int = 100, layers: int = 2):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=vocab,
                                  max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def test_every_partition_sums_to_the_dense_ffn_exactly_fp64():
    mlp = dense(dtype=torch.float64).model.layers[0].mlp
    x = torch.randn(7, 32, dtype=torch.float64)
    for part in (random_partition(64, 8, seed=3), balanced_kmeans(mlp.gate_proj.weight, 4)):
        assert sorted(part.flatten().tolist()) == list(range(64))
        gate_up, down = expert_tensors(mlp, part, scale=1.0)
        total = sum(down[e] @ (mlp.act_fn(gate_up[e][:part.shape[1]] @ x.T) * (gate_up[e][part.shape[1]:] @ x.T))
                    for e in range(part.shape[0])).T
        assert torch.allclose(total, mlp(x), rtol=0, atol=1e-12)


def planted_rows(groups: int = 4, per: int = 6, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=g), dim=1)
    labels = torch.arange(groups).repeat_interleave(per)
    rows = centres[labels] + 0.05 * torch.randn(groups * per, dim, generator=g)
    perm = torch.randperm(groups * per, generator=g)
    return rows[perm], labels[perm]


def test_balanced_kmeans_equal_sizes_and_planted_clusters():
    rows, labels = planted_rows()
    part = balanced_kmeans(rows, 4)
    assert part.shape == (4, 6)
    assert sorted(part.flatten().tolist()) == list(range(24))
    assert sorted(sorted(set(labels[p].tolist())) for p in part) == [[0], [1], [2], [3]]


def test_balanced_kmeans_keeps_sizes_equal_when_clusters_are_not():
    rows, _ = planted_rows(groups=2, per=12)  # two planted groups of 12, asked for 4 experts of 6
    part = balanced_kmeans(rows, 4)
    assert part.shape == (4, 6) and sorted(part.flatten().tolist()) == list(range(24))


def test_coactivation_groups_neurons_that_fire_together():
    g = torch.Generator().manual_seed(1)
    which = torch.randint(0, 3, (200,), generator=g)  # each token switches on one planted group of 5 neurons
    owner = torch.arange(3).repeat_interleave(5)[torch.randperm(15, generator=g)]
    acts = (owner[None, :] == which[:, None]).float() * 2 + 0.05 * torch.randn(200, 15, generator=g)
    part = coactivation_partition(acts, 3)
    assert sorted(sorted(set(owner[p].tolist())) for p in part) == [[0], [1], [2]]


def test_learned_router_selects_the_planted_expert():
    """Inputs of type j make only neurons of planted group j fire (their gate rows align with direction j); the
    router learns to rank the expert holding group j first."""
    model = dense()
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(2)
    dirs = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T  # 4 orthonormal directions
    owner = torch.arange(4).repeat_interleave(16)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(dirs[owner] * 3 + 0.01 * torch.randn(64, 32, generator=g))
    part = torch.stack([torch.nonzero(owner == j).flatten() for j in (2, 0, 3, 1)])  # expert e holds group perm[e]
    kind = torch.randint(0, 4, (400,), generator=g)
    x = dirs[kind] * 2 + 0.1 * torch.randn(400, 32, generator=g)
    router = learned_router(mlp.gate_proj.weight, part, x, activations(mlp, x), steps=200)
    expert_of_group = {2: 0, 0: 1, 3: 2, 1: 3}
    chosen = (x @ router.T).argmax(1)
    assert (chosen == torch.tensor([expert_of_group[int(k)] for k in kind])).float().mean() > 0.95


@pytest.mark.parametrize("model_type, family", [("qwen3", "Qwen3MoeForCausalLM"), ("llama", "MixtralForCausalLM")])
def test_converted_model_with_every_expert_equals_dense(model_type, family, tmp_path):
    model = dense(model_type)
    ids = torch.randint(0, 100, (2, 12))
    ref = model(ids).logits
    moe, plan = mk.moefy(model, experts=8, k=8, partition="kmeans", router="centroid")
    assert type(moe).__name__ == family and plan["target_type"] == moe.config.model_type
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, ref, atol=1e-4)  # weights 1/k within exp(+-2e-3), times k
        fewer, _ = mk.moefy(model, experts=8, k=2, partition="kmeans", router="centroid")
        assert not torch.allclose(fewer(ids).logits, ref, atol=1e-4)  # 2 of 8 experts is an approximation
    mh.save(moe, tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # plain transformers, native family
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, moe(ids).logits, atol=1e-6)


def test_some_layers_stay_dense_in_qwen3_moe():
    model = dense(layers=3)
    moe, plan = mk.moefy(model, experts=4, k=4, layers=[1], partition="random", router="emoe")
    assert moe.config.mlp_only_layers == [0, 2] and list(plan["layers"]) == ["1"]
    assert torch.equal(moe.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": 6, "k": 2}, "experts=6: expected a divisor of the FFN width 64"),
    ({"experts": 4, "k": 5}, "k=5: expected an integer in 1..experts=4"),
    ({"experts": 4, "k": 2, "router": "learned"}, "needs calibration text"),
    ({"experts": 4, "k": 2, "partition": "spectral"}, "partition='spectral'"),
    ({"experts": 4, "k": 2, "layers": [0]}, "mixtral has no dense layers"),
])
def test_bad_settings_refused(kwargs, message):
    model = dense("llama")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mk.moefy(model, **kwargs)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny random Qwen3 with moekit-tiny's tokenizer (same vocabulary size)."""
    d = tmp_path_factory.mktemp("dense") / "model"
    dense(vocab=4096).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, d / name)
    return d


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_cli_learned_router_on_data(dense_dir, tmp_path, capsys):
    data = tmp_path / "cal.txt"
    data.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n" * 30)
    before = _digest(dense_dir)
    out = tmp_path / "moe"
    assert main(["make", str(dense_dir), "--experts", "4", "--k", "2", "--router", "learned", "--method",
                 "coactivation", "--data", str(data), "--max-tokens", "256", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_type"] == "qwen3_moe" and summary["layers"] == [0, 1]
    assert _digest(dense_dir) == before
    plan = json.loads((out / "plan.json").read_text())
    assert all(sorted(sum(p, [])) == list(range(64)) for p in plan["layers"].values())
    assert (out / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 4


@pytest.mark.parametrize("args, message", [
    (["--experts", "6", "--k", "2"], "experts=6"),
    (["--experts", "4", "--k", "2", "--router", "learned"], "expected --data FILE"),
    (["--experts", "4", "--k", "9"], "k=9"),
])
def test_cli_refusals(dense_dir, tmp_path, capsys, args, message):
    before = _digest(dense_dir)
    out = tmp_path / "out"
    assert main(["make", str(dense_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("moekit make: error:")
    assert _digest(dense_dir) == before and not out.exists()


def test_cli_refuses_an_moe_and_an_unknown_architecture(tmp_path, capsys):
    assert main(["make", str(default_model_path()), "--experts", "4", "--k", "2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "already an MoE" in err and "moekit compress" in err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["make", str(gpt2), "--experts", "4", "--k", "2", "--out", str(tmp_path / "b")]) == 2
    assert "no known FFN" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_upcycled_model_equals_dense_at_step_zero(model_type):
    model = dense(model_type)
    ids = torch.randint(0, 100, (2, 11))
    inputs = mk.capture_inputs(model, [torch.randint(0, 100, (40,))], range(2))
    with torch.no_grad():
        ref = model(ids).logits
        for router in ("random", "hidden"):
            moe, plan = mk.upcycle(model, experts=4, k=2, router=router, inputs=inputs)
            assert plan["partition"] == "upcycle"
            assert torch.allclose(moe(ids).logits, ref, atol=1e-5)  # copies whose weights sum to 1
            router_w = [b.router.weight for b in mh.view(moe)]
            assert all(float(w.std()) == pytest.approx(0.02, rel=0.3) for w in router_w)
    with pytest.raises(ConfigError, match="router=hidden: needs calibration"):
        mk.upcycle(model, experts=4, k=2, router="hidden")
    with pytest.raises(ConfigError, match="upcycling routers"):
        mk.upcycle(model, experts=4, k=2, router="centroid")


def test_cli_upcycle_with_hidden_router(dense_dir, tmp_path, capsys):
    data = tmp_path / "cal.txt"
    data.write_text("import os\nprint(os.getcwd())\n" * 40)
    out = tmp_path / "up"
    assert main(["make", str(dense_dir), "--method", "upcycle", "--router", "hidden", "--experts", "3", "--k", "2",
                 "--data", str(data), "--max-tokens", "128", "--out", str(out)]) == 0
    assert "upcycle" in capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.num_experts == 3 and moe.config.moe_intermediate_size == 64
