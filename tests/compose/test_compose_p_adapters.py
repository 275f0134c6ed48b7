"""P-Adapters' input-conditioned variant: weights depend on the input (by the formula, computed by hand here), forced
weights give one prompt expert exactly (against PromptedLM), training moves the P-Adapter only, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compose.conftest import dense_lm
from moekit.compose.loop import lm_loss
from moekit.compose.model_routing import PromptedLM
from moekit.compose.p_adapters import (
    PAdapter,
    PAdapterError,
    PAdapterLM,
    load_p_adapter,
    save_p_adapter,
    train_p_adapter,
)
from moekit.errors import UnknownNameError


def prompts_for(model, n: int = 3, tokens: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"e{i}": torch.randn(tokens, model.config.hidden_size, generator=g) * 0.5 for i in range(n)}


def by_hand(adapter: PAdapter, rep: torch.Tensor) -> torch.Tensor:
    h = F.layer_norm(rep, rep.shape[-1:], adapter.norm.weight, adapter.norm.bias)
    return torch.softmax(F.gelu(h @ adapter.proj.weight.T + adapter.proj.bias) @ adapter.out.weight.T
                         + adapter.out.bias, dim=-1)


def test_weights_depend_on_the_input_by_the_formula():
    model = dense_lm()
    lm = PAdapterLM(model, PAdapter(prompts_for(model), hidden=16))
    a, b = torch.tensor([[5, 9, 14, 3]]), torch.tensor([[60, 61, 62, 63]])
    with torch.no_grad():
        wa, wb = lm.route(a), lm.route(b)
        rep = model.get_input_embeddings()(a).mean(1)
        assert torch.allclose(wa, by_hand(lm.adapter, rep), atol=1e-6)
        assert torch.allclose(wa.sum(-1), torch.ones(1))
        assert (wa - wb).abs().max() > 1e-3  # another input, other weights
        assert torch.allclose(lm.route(torch.cat([a, a])), torch.cat([wa, wa]), atol=1e-6)
        # the prompt placed before the input is the weighted sum of the experts, computed by hand
        out = lm(a).logits
        prompt = sum(wa[0, e] * lm.adapter.prompts[e] for e in range(3))
        embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(a)], dim=1)
        assert torch.allclose(out, model(inputs_embeds=embeds).logits[:, 2:], atol=1e-5)
        # route_ids: the weights come from the given context, not from the input
        lm(a, route_ids=b)
        assert torch.allclose(lm.last_weights, wb, atol=1e-6)


def test_hidden_representation():
    model = dense_lm()
    lm = PAdapterLM(model, PAdapter(prompts_for(model), hidden=8, representation="hidden"))
    ids = torch.tensor([[5, 9, 14, 3], [7, 7, 8, 1]])
    with torch.no_grad():
        rep = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(1)
        assert torch.allclose(lm.route(ids), by_hand(lm.adapter, rep), atol=1e-6)


def test_forced_weights_reproduce_one_prompt_expert_exactly():
    model = dense_lm()
    prompts = prompts_for(model)
    lm = PAdapterLM(model, PAdapter(prompts, hidden=16))
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        outs = []
        for e, name in enumerate(prompts):
            want = PromptedLM(model, prompts[name])(ids).logits
            got = lm(ids, forced=e).logits
            assert torch.equal(got, want)
            assert torch.equal(lm(ids, weights=F.one_hot(torch.tensor([e, e]), 3).float()).logits, want)
            outs.append(got)
        assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(PAdapterError, match="forced=3: expected an expert index below 3"):
        lm(ids, forced=3)


def test_training_moves_the_p_adapter_only():
    model = dense_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = PAdapter(prompts_for(model), hidden=16)
    start = {k: v.clone() for k, v in adapter.state_dict().items()}
    windows = torch.cat([torch.tensor([[5, 6, 7, 8] * 3] * 4), torch.tensor([[40, 41] * 6] * 4)])
    lm = PAdapterLM(model, adapter)
    with torch.no_grad():
        loss0 = float(lm_loss(lm, windows))
    result = train_p_adapter(model, adapter, windows, steps=20, lr=0.05, batch_size=8, progress=False)
    assert result["steps"] == 20
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    moved = [k for k, v in adapter.state_dict().items() if not torch.equal(v, start[k])]
    assert {"prompts", "proj.weight", "out.weight"} <= set(moved)
    with torch.no_grad():
        assert float(lm_loss(lm, windows)) < loss0
    frozen = PAdapter(prompts_for(model), hidden=16, train_prompts=False)
    p0 = frozen.prompts.clone()
    train_p_adapter(model, frozen, windows, steps=3, lr=0.05, batch_size=4, progress=False)
    assert torch.equal(frozen.prompts, p0)  # the network alone trained


def test_save_load_round_trip_and_bad_input(tmp_path):
    model = dense_lm()
    adapter = PAdapter(prompts_for(model), hidden=16, representation="hidden")
    path = save_p_adapter(adapter, tmp_path / "pa.safetensors")
    loaded = load_p_adapter(path)
    assert loaded.names == adapter.names and loaded.representation == "hidden"
    rep = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(loaded.weights(rep), adapter.weights(rep))
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PAdapterError, match="not a P-Adapter file"):
        load_p_adapter(tmp_path / "x.safetensors")
    with pytest.raises(UnknownNameError, match="representation 'pooled': unknown"):
        PAdapter(prompts_for(model), representation="pooled")
    with pytest.raises(PAdapterError, match="no prompt experts"):
        PAdapter({})
    with pytest.raises(PAdapterError, match="expected the model's hidden size"):
        PAdapterLM(model, PAdapter({"a": torch.zeros(2, 5)}))
