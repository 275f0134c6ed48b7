"""LoRA-MoE layers over pools of saved PEFT adapters: forced routing equals PEFT, the variants against hand-written
formulas, aux losses, attach/detach, save/load, and the one-line errors for bad pools."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from conftest import DENSE_TARGETS, QWEN_TARGETS, dense_lm, dsv3_moe_lm, moe_lm, save_random_adapter
from hf.tiny import tiny_model
from moekit.compose import LoraMoE, RuleConfig, evaluate_ppl, fit
from moekit.compose.expert_lora import ExpertsLoraMoE
from moekit.compose.mixers import HydraLinear, InputRouting, MoRALinear, poly_model
from moekit.errors import ConfigError, UnknownNameError

IDS = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 61], [1, 7, 7, 30, 12, 90, 4, 4]])
TARGETS = ["q_a_proj", "o_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [save_random_adapter(dense_lm(), root / f"a{i}", seed=10 + i, targets=TARGETS) for i in range(3)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_logits(adapter, build=dense_lm) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(build(), str(adapter)).eval())


@pytest.mark.parametrize("router", ["topk", "dynmole", "mixer", "soft"])
def test_forced_to_one_expert_equals_that_peft_adapter(adapters, router):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, router=router, k=2)
    base = logits(dense_lm())
    for i, adapter in enumerate(adapters):
        moe.force(i)
        expected = peft_logits(adapter)
        assert not torch.allclose(expected, base, atol=1e-3)  # the adapter does change the output
        assert torch.allclose(logits(moe.model), expected, atol=2e-5, rtol=1e-5)


def test_forced_on_moe_base_with_fused_experts(tmp_path):
    adapter = save_random_adapter(moe_lm(), tmp_path / "a", seed=3, targets=QWEN_TARGETS)
    other = save_random_adapter(moe_lm(), tmp_path / "b", seed=4, targets=QWEN_TARGETS)
    moe = LoraMoE.from_adapters(moe_lm(), [other, adapter], router="topk", k=1)
    moe.force(1)
    assert torch.allclose(logits(moe.model), peft_logits(adapter, moe_lm), atol=2e-5, rtol=1e-5)


def test_forced_on_deepseek_v3_moe_base(tmp_path):
    adapter = save_random_adapter(dsv3_moe_lm(), tmp_path / "a", seed=5, targets=DENSE_TARGETS)
    other = save_random_adapter(dsv3_moe_lm(), tmp_path / "b", seed=6, targets=DENSE_TARGETS)
    moe = LoraMoE.from_adapters(dsv3_moe_lm(), [adapter, other], router="mixer", k=1)
    assert len(moe.layers) == 3 * len(DENSE_TARGETS)
    moe.force(0)
    assert torch.allclose(logits(moe.model), peft_logits(adapter, dsv3_moe_lm), atol=2e-5, rtol=1e-5)


def test_modules_keeps_the_named_layers_only(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, router="mixer", modules=["o_proj"])
    assert sorted(moe.layers) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ConfigError, match=r"none of the adapters' layers.*expected some of \['o_proj', 'q_a_proj'\]"):
        LoraMoE.from_adapters(dense_lm(), adapters, modules=["gate_proj"])


def test_pool_of_one_adapter_twice_equals_it_under_any_rule(adapters):
    """Weights of every rule sum to 1 per token, so a pool of identical experts is that expert."""
    expected = peft_logits(adapters[0])
    for router in ("topk", "dynmole", "mixer", "soft"):
        moe = LoraMoE.from_adapters(dense_lm(), [adapters[0], adapters[0]], router=router, k=1)
        assert torch.allclose(logits(moe.model), expected, atol=2e-5, rtol=1e-5), router


def test_detach_restores_the_base_model(adapters):
    model = dense_lm()
    before = logits(model)
    moe = LoraMoE.from_adapters(model, adapters, router="topk")
    assert not torch.allclose(logits(model), before, atol=1e-4)
    assert moe.detach() is model
    assert torch.equal(logits(model), before)
    assert not any("router" in name for name, _ in model.named_parameters())


def test_aux_losses_are_returned_and_reach_the_router(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, router="dynmole", q=2.0)
    moe.model(input_ids=IDS)
    aux = moe.aux_losses()
    assert set(aux) == {"tsallis", "balance"}
    n_layers = len(moe.layers)
    assert n_layers == 4  # q_a_proj and o_proj in two layers
    assert 0 < aux["tsallis"].item() <= n_layers * (1 - 1 / 3) / (2.0 - 1.0) + 1e-6  # each at most the uniform's
    moe.aux_loss({"balance": 0.0}).backward()
    routers = moe.trainable_parameters()
    assert len(routers) == n_layers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


def test_mixer_labels_feed_the_specialisation_loss(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, router="mixer", k=1)
    moe.model(input_ids=IDS)
    unlabelled = moe.aux_losses()["sbl"].item()
    moe.set_labels(torch.full(IDS.shape, 2))
    moe.model(input_ids=IDS)
    assert moe.aux_losses()["sbl"].item() > unlabelled  # the cross-entropy towards expert 2 is positive
    moe.set_labels(None)


def test_training_moves_routers_only(adapters):
    model = dense_lm()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    moe = LoraMoE.from_adapters(model, adapters, router="dynmole")
    routers_before = [p.detach().clone() for p in moe.trainable_parameters()]
    pools_before = [layer.pool.a.detach().clone() for layer in moe.layers.values()]
    windows = torch.randint(3, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    out = fit(model, windows, moe.trainable_parameters(), steps=3, batch_size=2, aux=moe.aux_loss, aux_weight=0.01,
              progress=False)
    assert out["steps"] == 3 and len(out["losses"]) == 3
    assert any(not torch.equal(a, b.detach()) for a, b in zip(routers_before, moe.trainable_parameters(), strict=True))
    assert all(torch.equal(a, layer.pool.a) for a, layer in zip(pools_before, moe.layers.values(), strict=True))
    moe.detach()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())
    assert evaluate_ppl(model, windows) > 1.0


def test_save_and_load_round_trip(adapters, tmp_path):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, router="topk", k=2)
    with torch.no_grad():
        for p in moe.trainable_parameters():
            p.normal_()
    expected = logits(moe.model)
    moe.save(tmp_path / "mix")
    again = LoraMoE.load(dense_lm(), tmp_path / "mix")
    assert torch.allclose(logits(again.model), expected, atol=1e-6)
    assert again.spec["adapters"] == [str(a) for a in adapters]


def test_mora_budget_against_hand_formula(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters[:2], kind="mora", budget=3)
    layer = moe.layers["model.layers.0.self_attn.o_proj"]
    assert isinstance(layer, MoRALinear)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    a, b = layer.pool.a.detach(), layer.pool.b.detach()  # [2, 4, 40], [2, 40, 4]
    s = layer.pool.scaling
    expected = []
    for t in range(5):
        h = [(e, j, float(a[e, j] @ x[t])) for e in range(2) for j in range(4)]
        kept = sorted(h, key=lambda v: -abs(v[2]))[:3]
        expected.append(layer.base(x[t]) + sum(s[e] * v * b[e, :, j] for e, j, v in kept))
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.stack(expected), atol=1e-5)


def test_mora_full_budget_of_one_adapter_is_that_adapter(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters[:1], kind="mora", budget=4)
    assert torch.allclose(logits(moe.model), peft_logits(adapters[0]), atol=2e-5, rtol=1e-5)


def test_mora_prune_drops_unused_ranks(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters[:2], kind="mora", budget=2)
    layer = moe.layers["model.layers.1.self_attn.o_proj"]
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))  # 3 tokens keep at most 6 of 8 ranks
    layer.train()
    with torch.no_grad():
        before = layer(x)
    used = int((layer.usage > 0).sum())
    assert used < 8  # some rank-1 experts were never among a token's top 2
    dropped = layer.prune(min_share=1e-9)
    assert dropped == 8 - used and layer.pool.a.shape[1] <= 4
    with torch.no_grad():
        assert torch.allclose(layer(x), before, atol=1e-6)  # the dropped ranks never contributed on these tokens


def test_hydra_starts_as_its_parallel_branch_and_adds_the_sequential_one(adapters):
    moe = LoraMoE.from_adapters(dense_lm(), adapters, kind="hydra", router="topk", k=1, seq_rank=2)
    layer = moe.layers["model.layers.0.self_attn.o_proj"]
    assert isinstance(layer, HydraLinear)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.inner(x))  # B_s = 0 at the start
        layer.seq_b.normal_()
        expected = layer.inner(x) + layer.seq_scaling * (layer.inner.base(x) @ layer.seq_a.T) @ layer.seq_b.T
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert any(p is layer.seq_b for p in moe.trainable_parameters())


def test_poly_input_routing_attach_detach():
    peft_model = poly_model(dense_lm(), ["o_proj"], n_tasks=2, n_skills=3, n_splits=2, r=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "poly_lora_B" in name:
                p.normal_()
            if "module_logits" in name:
                p.zero_()  # PEFT's router then weighs the skills of each head equally
    peft_model.eval()
    task = torch.tensor([0, 1])
    uniform = peft_model.base_model(input_ids=IDS, task_ids=task).logits.detach()  # PolyModel takes task_ids
    routing = InputRouting.attach(peft_model)
    assert len(routing.routers) == 2
    with torch.no_grad():
        by_input = peft_model(input_ids=IDS).logits  # zero-initialised input routers: equal weights too
        assert torch.allclose(by_input, uniform, atol=1e-6)
        for router in routing.routers:
            router.proj.weight.normal_()
        moved = peft_model(input_ids=IDS).logits
    assert not torch.allclose(moved, by_input, atol=1e-4)
    routing.detach()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "module_logits" in name:
                p.normal_()
        by_task = peft_model.base_model(input_ids=IDS, task_ids=task).logits
    assert not torch.allclose(by_task, uniform, atol=1e-4)  # PEFT's task routers are back in charge


def test_bad_pools_are_one_line_errors(adapters, tmp_path):
    with pytest.raises(ConfigError, match="adapter pool is empty"):
        LoraMoE.from_adapters(dense_lm(), [])
    with pytest.raises(UnknownNameError, match="router 'nope' does not exist"):
        LoraMoE.from_adapters(dense_lm(), adapters, router="nope")
    other_rank = save_random_adapter(dense_lm(), tmp_path / "r8", seed=1, r=8, targets=TARGETS)
    with pytest.raises(ConfigError, match="rank r=8.*expected one rank in a pool"):
        LoraMoE.from_adapters(dense_lm(), [adapters[0], other_rank])
    with pytest.raises(ConfigError, match="q_a_proj' does not exist in the base model"):
        LoraMoE.from_adapters(moe_lm(), adapters)  # adapters of the dense DeepSeek-V3 on a Qwen3-MoE
    wide = save_random_adapter(dense_lm(), tmp_path / "wide", seed=1, targets=DENSE_TARGETS)
    with pytest.raises(ConfigError, match="adapts other modules"):
        LoraMoE.from_adapters(dense_lm(), [adapters[0], wide])
    with pytest.raises(ConfigError, match="expected a PEFT adapter directory"):
        LoraMoE.from_adapters(dense_lm(), [tmp_path])
    for err in (ConfigError, UnknownNameError):
        assert "\n" not in str(err("x"))


EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("build, targets", [(moe_lm, ["q_proj"]), (dsv3_moe_lm, ["o_proj"])])
def test_forced_on_expert_parameters_equals_peft_target_parameters(tmp_path, build, targets):
    """LoRA-MoE over PEFT adapters on the fused 3D experts (target_parameters) plus an attention layer: forced to
    one adapter, the rewritten expert computation equals PEFT's ParamWrapper."""
    adapters = [save_random_adapter(build(), tmp_path / f"e{i}", seed=20 + i, targets=targets,
                                    target_parameters=EXPERT_PARAMS) for i in range(2)]
    base = logits(build())
    moe = LoraMoE.from_adapters(build(), adapters, router="dynmole")
    experts = [name for name in moe.layers if name.endswith(".experts")]
    assert experts and all(isinstance(moe.layers[n], ExpertsLoraMoE) for n in experts)
    for i, adapter in enumerate(adapters):
        moe.force(i)
        expected = peft_logits(adapter, build)
        assert not torch.allclose(expected, base, atol=1e-3)
        assert torch.allclose(logits(moe.model), expected, atol=2e-5, rtol=1e-5)
    moe.set_rule(RuleConfig("soft"))
    mixed = logits(moe.model)
    assert set(moe.aux_losses()) == set() and len(moe.routing()) == len(moe.layers)
    moe.save(tmp_path / "mix")
    again = LoraMoE.load(build(), tmp_path / "mix")
    assert torch.allclose(logits(again.model), mixed, atol=1e-6)
    assert moe.detach() is moe.model and torch.equal(logits(moe.model), base)


def test_expert_parameter_pool_errors(tmp_path):
    only_experts = save_random_adapter(moe_lm(), tmp_path / "x", seed=1, targets=["q_proj"],
                                       target_parameters=EXPERT_PARAMS)
    down_only = save_random_adapter(moe_lm(), tmp_path / "d", seed=2, targets=["q_proj"],
                                    target_parameters=["experts.down_proj"])
    with pytest.raises(ConfigError, match="adapts other modules|same target parameters"):
        LoraMoE.from_adapters(moe_lm(), [only_experts, down_only])
    other_base = save_random_adapter(moe_lm(), tmp_path / "o", seed=3, targets=["q_proj"],
                                     target_parameters=EXPERT_PARAMS)
    wider = tiny_model("qwen3_moe", moe_intermediate_size=24)  # experts of another width: shapes differ
    with pytest.raises(ConfigError, match="fit no expert parameter"):
        LoraMoE.from_adapters(wider, [other_base])


def test_mora_on_expert_parameters(tmp_path):
    """MoRA over expert-parameter LoRAs: one adapter at full budget is that PEFT adapter; a smaller budget against
    the hand formula (per token routed to expert j: the budget largest |a_{e,j,i} . x| kept); save/load."""
    adapters = [save_random_adapter(moe_lm(), tmp_path / f"e{i}", seed=30 + i, targets=["q_proj"],
                                    target_parameters=EXPERT_PARAMS) for i in range(2)]
    one = LoraMoE.from_adapters(moe_lm(), adapters[:1], kind="mora", budget=4)
    layer = next(m for n, m in one.layers.items() if n.endswith(".experts"))
    assert layer.budget == 4 and not layer.router.weight.requires_grad
    assert torch.allclose(logits(one.model), peft_logits(adapters[0], moe_lm), atol=2e-5, rtol=1e-5)
    moe = LoraMoE.from_adapters(moe_lm(), adapters, kind="mora", budget=3)
    name, layer = next((n, m) for n, m in moe.layers.items() if n.endswith(".experts"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, layer.base.gate_up_proj.shape[2], generator=g)
    a, b, s = layer.pool["a"]["gate_up_proj"].detach(), layer.pool["b"]["gate_up_proj"].detach(), layer.scaling
    n_adapters, r = a.shape[0], a.shape[2]
    with torch.no_grad():
        got = layer._delta("gate_up_proj", x, 1, None)
    for t in range(4):
        h = [(e, i, float(a[e, 1, i] @ x[t])) for e in range(n_adapters) for i in range(r)]
        kept = sorted(h, key=lambda v: -abs(v[2]))[:3]
        want = sum(s[e] * v * b[e, 1, :, i] for e, i, v in kept)
        assert torch.allclose(got[t], want, atol=1e-5)
    mixed = logits(moe.model)
    assert not torch.allclose(mixed, logits(one.model), atol=1e-4)
    moe.save(tmp_path / "mix")
    again = LoraMoE.load(moe_lm(), tmp_path / "mix")
    assert next(m for n, m in again.layers.items() if n.endswith(".experts")).budget == 3
    assert torch.allclose(logits(again.model), mixed, atol=1e-6)
    with pytest.raises(ConfigError, match="mora budget=9; expected 1 <= budget <= 8"):
        LoraMoE.from_adapters(moe_lm(), adapters, kind="mora", budget=9)
    with pytest.raises(ConfigError, match=r"mora budget=9; expected 1 <= budget <= 8 \(adapters x rank\)"):
        ExpertsLoraMoE(layer.base, dict(layer.pool["a"]), dict(layer.pool["b"]), layer.scaling, RuleConfig(),
                       budget=9)


def test_hydra_on_expert_parameters(tmp_path):
    """Hydra over expert-parameter LoRAs: the start is the parallel branch alone (B_s = 0); with B_s set, the
    output against a per-token hand loop of W_j x + parallel_j(x) + s B_s,j A_s,j (W_j x) on both parameters;
    sequential weights train; save/load."""
    import torch.nn.functional as F

    adapters = [save_random_adapter(moe_lm(), tmp_path / f"e{i}", seed=40 + i, targets=["q_proj"],
                                    target_parameters=EXPERT_PARAMS) for i in range(2)]
    moe = LoraMoE.from_adapters(moe_lm(), adapters, kind="hydra", router="soft", seq_rank=2, seq_alpha=4.0)
    layer = next(m for n, m in moe.layers.items() if n.endswith(".experts"))
    assert isinstance(layer, ExpertsLoraMoE) and set(layer.seq_a) == {"gate_up_proj", "down_proj"}
    assert any(p is layer.seq_b["down_proj"] for p in moe.trainable_parameters())
    g = torch.Generator().manual_seed(3)
    hidden = layer.base.gate_up_proj.shape[2]
    x = torch.randn(5, hidden, generator=g)
    top = torch.stack([torch.randperm(layer.base.gate_up_proj.shape[0], generator=g)[:2] for _ in range(5)])
    top_w = torch.rand(5, 2, generator=g)
    with torch.no_grad():
        start = layer(x, top, top_w)
        seq_a, seq_b = dict(layer.seq_a), dict(layer.seq_b)
        layer.seq_a, layer.seq_b = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        assert torch.allclose(layer(x, top, top_w), start, atol=1e-6)  # B_s = 0: the parallel branch alone
        layer.seq_a, layer.seq_b = torch.nn.ParameterDict(seq_a), torch.nn.ParameterDict(seq_b)
        for t in layer.seq_b.values():
            t.normal_(0, 0.3, generator=g)
        got = layer(x, top, top_w)
        w = layer.weights  # the soft routing weights of this forward [5, N]
        s = layer.seq_scaling
        assert s == 2.0 and not torch.allclose(got, start, atol=1e-4)
        base, pool = layer.base, layer.pool
        for t in range(5):
            want = torch.zeros(hidden)
            for slot in range(2):
                j = int(top[t, slot])

                def branch(p, v, j=j, t=t):
                    out = F.linear(v, getattr(base, p)[j])
                    par = sum(w[t, e] * layer.scaling[e] * (pool["b"][p][e, j] @ (pool["a"][p][e, j] @ v))
                              for e in range(2))
                    return out + par + s * (layer.seq_b[p][j] @ (layer.seq_a[p][j] @ out))

                gate, up = branch("gate_up_proj", x[t]).chunk(2)
                want += top_w[t, slot] * branch("down_proj", base.act_fn(gate) * up)
            assert torch.allclose(got[t], want, atol=1e-5)
    mixed = logits(moe.model)
    moe.save(tmp_path / "mix")
    again = LoraMoE.load(moe_lm(), tmp_path / "mix")
    assert torch.allclose(logits(again.model), mixed, atol=1e-6)
