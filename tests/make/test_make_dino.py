"""Dynamic-DINO's router initialisation (`--router dino`): the FFN split into k pieces, E/k copies of each, a router
tiled k times; the MoE equals the dense model at step 0 with k < E experts per token."""

from __future__ import annotations

import pytest
import torch
from make_families import dense_model, save_tiny_tokenizer

import moekit.hf as mh
import moekit.make as mk
from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.make.routers import dino_router


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type,experts,k", [("qwen3", 8, 2), ("qwen3", 6, 3), ("llama", 8, 2),
                                                  ("qwen2", 8, 2), ("deepseek_v3", 8, 2)])
def test_dino_equals_dense_at_step_0_with_k_below_e(model_type, experts, k):
    dense = dense_model(model_type, dtype=torch.float64)
    ids = torch.randint(0, 100, (2, 9))
    moe, plan = mk.moefy(dense, experts=experts, k=k, partition="kmeans", router="dino")
    assert plan["router"] == "dino"
    blocks = mh.view(moe)
    assert len(blocks) == 2 and blocks[0].num_experts == experts and blocks[0].k == k
    # equal up to the family's router softmax / sigmoid, which transformers computes in float32 (1/k to 1e-7)
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-6)
    # the same pieces routed by the ordinary split (E pieces, top-k of them) drop neurons: not equal
    other, _ = mk.moefy(dense, experts=experts, k=k, partition="kmeans", router="centroid")
    assert not torch.allclose(logits(other, ids), logits(dense, ids), rtol=0, atol=1e-3)
    # expert g * E/k + c is copy c of piece g: the k pieces cover the routed neurons once
    part = torch.tensor(plan["layers"]["0"])
    copies = experts // k
    assert all(torch.equal(part[g * copies], part[g * copies + c]) for g in range(k) for c in range(copies))
    pieces = torch.cat([part[g * copies] for g in range(k)]).tolist()
    assert len(set(pieces)) == len(pieces) == dense.config.intermediate_size * k // (k + plan["shared"])


def test_dino_picks_one_copy_of_every_piece():
    dense = dense_model("qwen3", dtype=torch.float64)
    moe, _ = mk.moefy(dense, experts=8, k=2, router="dino")
    chosen = []
    hook = mh.view(moe)[0].router.register_forward_hook(lambda _m, _a, out: chosen.append(out[2]))
    logits(moe, torch.randint(0, 100, (1, 12)))
    hook.remove()
    idx = chosen[0].reshape(-1, 2)
    assert idx.shape[0] == 12
    assert torch.equal((idx // 4).sort(-1).values, torch.tensor([[0, 1]]).expand(12, -1))  # one copy per piece
    assert torch.equal(idx[:, 0] % 4, idx[:, 1] % 4)  # the same copy c of both pieces


def test_dino_router_is_tiled_and_refuses_bad_sizes():
    w = dino_router(8, 2, 5, seed=1)
    assert w.shape == (8, 5) and torch.equal(w[:4], w[4:]) and not torch.equal(w[0], w[1])
    with pytest.raises(ConfigError, match="not a multiple of k=3"):
        dino_router(8, 3, 5)
    dense = dense_model("qwen3")
    with pytest.raises(ConfigError, match="router=dino: k=3, experts=8"):
        mk.moefy(dense, experts=8, k=3, router="dino")
    with pytest.raises(ConfigError, match=r"k=5 \(the FFN's pieces, router dino\).*divisor of the FFN width 72"):
        mk.moefy(dense, experts=10, k=5, router="dino")


def test_cli_make_router_dino_saves_a_model_equal_to_dense(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    src = tmp_path / "dense"
    vocab = save_tiny_tokenizer(src)
    dense = dense_model("qwen3", vocab=vocab)
    dense.save_pretrained(src)
    out = tmp_path / "moe"
    capsys.readouterr()
    assert main(["make", str(src), "--experts", "8", "--k", "2", "--router", "dino", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["router"] == "dino" and summary["experts"] == 8 and summary["k"] == 2
    moe = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    ids = torch.randint(0, vocab, (1, 10))
    assert torch.allclose(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-4)
    capsys.readouterr()
    assert main(["make", str(src), "--experts", "8", "--k", "3", "--router", "dino", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router=dino" in err[0] and not (tmp_path / "x").exists()
