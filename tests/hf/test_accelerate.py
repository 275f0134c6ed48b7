"""accelerate / restore: moekit's dispatch in place of transformers' experts, for every family, against
transformers' own forward on the same model (eager and grouped_mm experts), fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_TYPES, tiny_model

import moekit.hf as mh
from moekit.errors import ConfigError

# k = 1 and k = E (E = 6) next to the default k = 2; PhiMoE's sparsemixer is always top-2. DeepSeek's group
# limits need topk_group * E / n_group >= k, so k = E uses one group.
SIZES = {
    "k1": dict(num_experts_per_tok=1),
    "kE": dict(num_experts_per_tok=6),
}
GROUPS_FOR_KE = dict(n_group=1, topk_group=1)


def _model(model_type: str, size: str | None = None, **kw):
    overrides = dict(SIZES[size]) if size else {}
    if size == "kE" and model_type.startswith("deepseek"):
        overrides.update(GROUPS_FOR_KE)
    return tiny_model(model_type, **overrides, **kw)


def _ids(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize(("size", "impl"), [(None, "auto"), ("k1", "auto"), ("kE", "auto"), (None, "loop"),
                                            (None, "grouped_mm"), (None, "threads")])
def test_logits_match_transformers_fp32(model_type, size, impl):
    if size and model_type == "phimoe":
        pytest.skip("PhiMoE's sparsemixer always routes to 2 experts")
    model = _model(model_type, size)
    ids = _ids(seq=40)  # 80 tokens: `auto` picks grouped_mm where alignment allows
    refs = {}
    for hf_impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(hf_impl)
        refs[hf_impl] = _logits(model, ids)
    mh.accelerate(model, impl=impl)
    assert mh.is_accelerated(model)
    got = _logits(model, ids)
    for hf_impl, ref in refs.items():
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"against transformers {hf_impl}")


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_restore_gives_back_the_original_forward(model_type):
    model = _model(model_type)
    ids = _ids()
    classes = [type(v.experts.module).forward for v in mh.view(model)]
    before = _logits(model, ids)
    mh.accelerate(model)
    mh.accelerate(model, impl="loop")  # a second call only changes the dispatch implementation
    mh.restore(model)
    assert not mh.is_accelerated(model)
    for v, cls_forward in zip(mh.view(model), classes, strict=True):
        assert "forward" not in v.experts.module.__dict__
        assert v.experts.module.forward.__func__ is cls_forward
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_bf16_within_stated_tolerance(model_type):
    """bf16: moekit accumulates expert outputs in fp32, transformers' eager experts in bf16, so they are not
    bit-equal, and a bf16 rounding can flip a later layer's top-k (GPT-OSS routes in bf16). Stated tolerance:
    moekit's max distance from the fp32 logits is at most 1.5x transformers' own bf16 distance + 0.02, and the two
    bf16 results differ on average by less than transformers' bf16 differs from fp32. The reference uses eager
    experts: transformers' grouped_mm raises on CPU bf16 when 2 * I bytes is not a multiple of 16 (I = 20 here)."""
    model = _model(model_type)
    model.set_experts_implementation("eager")
    ids = _ids(seq=40)  # auto picks grouped_mm where bf16 alignment allows (Mixtral-like widths), else loop
    ref32 = _logits(model, ids)
    model.to(torch.bfloat16)
    ref16 = _logits(model, ids).float()
    mh.accelerate(model)
    got16 = _logits(model, ids).float()
    hf_err = (ref16 - ref32).abs().max()
    mk_err = (got16 - ref32).abs().max()
    assert mk_err <= 1.5 * hf_err + 0.02, (mk_err, hf_err)
    assert (got16 - ref16).abs().mean() < (ref16 - ref32).abs().mean()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_greedy_generation_token_for_token(model_type):
    model = _model(model_type)
    ids = _ids(batch=1, seq=5, seed=2)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    mh.accelerate(model)
    assert torch.equal(model.generate(ids, **kw), expected)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_router_logits_and_aux_loss_unchanged(model_type):
    model = _model(model_type)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, labels=ids, output_router_logits=True)
        mh.accelerate(model)
        got = model(ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(mh.view(model))
    assert torch.equal(got.router_logits[0], ref.router_logits[0])  # later layers see ~1e-7 different inputs
    for a, b in zip(got.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_type", "impl"), [("qwen2_moe", "auto"), ("deepseek_v3", "auto"),
                                                  ("gpt_oss", "grouped_mm"), ("olmoe", "grouped_mm"),
                                                  ("mixtral", "threads")])
def test_gradients_match(model_type, impl):
    """Training through the swapped experts: same gradients on the experts, router and shared experts."""
    grads = []
    for accelerated in (False, True):
        model = _model(model_type)
        if accelerated:
            mh.accelerate(model, impl=impl)
        ids = _ids()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_unknown_impl_and_foreign_forward_are_refused():
    model = _model("mixtral")
    with pytest.raises(ConfigError, match="impl='fast'"):
        mh.accelerate(model, impl="fast")
    mh.view(model)[0].experts.module.forward = lambda *a: a[0]
    with pytest.raises(ConfigError, match="layer 0"):
        mh.accelerate(model)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_other_activations(hidden_act):
    """`gelu` maps to moekit's geglu; an activation moekit has no name for runs the module's own act_fn."""
    model = _model("qwen3_moe", hidden_act=hidden_act)
    ids = _ids()
    expected = _logits(model, ids)
    kind = getattr(mh.view(model)[0].experts.act, "kind", None)
    assert kind == ("geglu" if hidden_act == "gelu" else None)
    mh.accelerate(model)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_type", "overrides"), [("phimoe", {"router_jitter_noise": 0.5}),
                                                    ("mixtral", {"router_jitter_noise": 0.1})])
def test_training_mode_noise_is_the_familys(model_type, overrides):
    """In training, PhiMoE's router samples and Mixtral jitters its input; the experts swap draws no random
    numbers, so with the same seed the loss is the same."""
    model = _model(model_type, **overrides).train()
    ids = _ids()
    losses = []
    for accelerated in (False, True):
        if accelerated:
            mh.accelerate(model)
        torch.manual_seed(5)
        losses.append(model(ids, labels=ids).loss.detach())
    torch.manual_seed(6)
    other_seed = model(ids, labels=ids).loss.detach()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    assert not torch.allclose(other_seed, losses[0], atol=1e-5, rtol=0)  # the noise is really there


def test_mixed_dense_and_moe_layers():
    """Qwen2-MoE with decoder_sparse_step=2 and mlp_only_layers: only layer 1 is MoE; the dense MLPs stay as is."""
    model = _model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    ids = _ids()
    expected = _logits(model, ids)
    mh.accelerate(model)
    assert [v.layer for v in mh.view(model)] == [1]
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
