"""Model-level routing: CoE on planted separable categories, Glider's global + local routing, K-shot selection of a
planted best + diverse set, P-Adapters' prompt experts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from compose.conftest import dense_lm
from compose.test_compose_compeft import saved_lora
from moekit.compose.adapters import read_weights
from moekit.compose.glider import Glider
from moekit.compose.model_routing import (
    CompositionOfExperts,
    GliderGlobal,
    PromptedLM,
    RouterError,
    adapter_similarity,
    kshot_select,
    load_router,
    save_router,
    train_prompt,
)
from moekit.errors import UnknownNameError

WORDS = {"py": ["def", "return", "import", "class", "lambda", "self"],
         "fortune": ["love", "fortune", "wisdom", "beware", "friend", "tomorrow"],
         "gloss": ["noun", "verb", "having", "relating", "quality", "state"]}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it"]


def planted(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts whose category is planted by its marker words among shared filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        cat = list(WORDS)[i % len(WORDS)]
        words = [rng.choice(FILLER) for _ in range(12)] + [rng.choice(WORDS[cat]) for _ in range(4)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(cat)
    return texts, labels


def test_coe_tfidf_routes_planted_case_perfectly(tmp_path):
    texts, labels = planted(60, seed=0)
    test_texts, test_labels = planted(30, seed=1)
    experts = {"py": "lora-code", "fortune": "lora-fortunes", "gloss": "lora-glosses"}
    coe = CompositionOfExperts.fit(texts, labels, experts, features="tfidf")
    assert coe.categorise(test_texts) == test_labels
    assert coe.route(test_texts) == [experts[c] for c in test_labels]
    loaded = load_router(save_router(coe, tmp_path / "r.json"))
    assert loaded.route(test_texts) == coe.route(test_texts)
    assert np.allclose(loaded.scores(test_texts), coe.scores(test_texts))
    # with the labels shuffled there is nothing to learn: held-out routing is no longer perfect
    shuffled = labels[:]
    random.Random(3).shuffle(shuffled)
    assert CompositionOfExperts.fit(texts, shuffled, features="tfidf").categorise(test_texts) != test_labels


def test_coe_hidden_features_on_a_planted_case(tokenizer):
    model = dense_lm(vocab_size=len(tokenizer))
    texts = [("0123 4567 89 " * 4) + str(i) for i in range(8)] + [("hello world again " * 3) + str(i) for i in range(8)]
    labels = ["digits"] * 8 + ["words"] * 8
    coe = CompositionOfExperts.fit(texts[::2], labels[::2], features="hidden", model=model, tokenizer=tokenizer)
    assert coe.categorise(texts[1::2], model, tokenizer) == labels[1::2]
    with pytest.raises(RouterError, match="needs the base model"):
        coe.categorise(texts)


def test_coe_bad_input():
    texts, labels = planted(6, seed=0)
    with pytest.raises(UnknownNameError, match="features 'bow': unknown"):
        CompositionOfExperts.fit(texts, labels, features="bow")
    with pytest.raises(RouterError, match="category 'py': no expert"):
        CompositionOfExperts.fit(texts, labels, {"gloss": "x", "fortune": "y"})
    with pytest.raises(RouterError, match="at least two categories"):
        CompositionOfExperts.fit(texts, ["py"] * 6)


def test_kshot_selection_picks_planted_best_and_diverse_set():
    performance = [0.90, 0.88, 0.60, 0.30]  # expert 1 nearly as good as 0 but a near-duplicate of it
    similarity = np.array([[1.0, 0.99, 0.10, 0.20],
                           [0.99, 1.0, 0.12, 0.20],
                           [0.10, 0.12, 1.0, 0.30],
                           [0.20, 0.20, 0.30, 1.0]])
    # normalised performance [1, 0.933, 0.5, 0]; with λ = 1: expert 1 scores 0.933 - 0.99, expert 2 0.5 - 0.10
    assert kshot_select(performance, similarity, m=2, diversity=1.0) == [0, 2]
    assert kshot_select(performance, similarity, m=2, diversity=0.0) == [0, 1]  # performance alone
    # third pick: expert 1 scores 0.933 - 0.99 = -0.057, expert 3 0 - 0.30
    assert kshot_select(performance, similarity, m=3, diversity=1.0) == [0, 2, 1]
    with pytest.raises(RouterError, match="empty expert pool"):
        kshot_select([], np.zeros((0, 0)), m=1)
    with pytest.raises(RouterError, match="1 <= m <= E"):
        kshot_select(performance, similarity, m=5)


def test_adapter_similarity_finds_duplicates(tmp_path):
    a = read_weights(saved_lora(tmp_path / "a", seed=0))
    b = read_weights(saved_lora(tmp_path / "b", seed=1))
    sim = adapter_similarity([a, b, a])
    assert sim[0, 2] == pytest.approx(1.0, abs=1e-5) and abs(float(sim[0, 1])) < 0.5


def test_glider_global_planted():
    texts, labels = planted(60, seed=0)
    by_expert = {c: [t for t, y in zip(texts, labels, strict=True) if y == c] for c in WORDS}
    router = GliderGlobal.fit(by_expert, features="tfidf")
    test_texts, test_labels = planted(30, seed=1)
    assert router.route(test_texts) == test_labels


def test_glider_forced_to_one_expert_equals_that_peft_adapter(tmp_path):
    from peft import PeftModel

    paths = [saved_lora(tmp_path / f"a{i}", seed=i) for i in range(3)]
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    model = dense_lm()
    glider = Glider(model, [read_weights(p) for p in paths], alpha=100.0, k=1)
    for forced in range(3):
        glider.set_global(np.eye(3)[forced])  # the global router is sure: expert `forced` wins in every layer
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = PeftModel.from_pretrained(dense_lm(), paths[forced])(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5)
    layer = next(iter(glider.layers.values()))
    glider.set_global(np.zeros(3))  # local routing alone: per token, by |cos(x, v_e)|
    x = torch.randn(4, layer.base.in_features)
    expected = (torch.nn.functional.normalize(x, dim=-1) @ layer.protos.T).abs().argmax(-1)
    assert torch.equal(layer.weights(x).argmax(-1), expected)
    glider.detach()
    assert all(type(m).__name__ != "GliderLinear" for m in model.modules())


def test_glider_gates_formula_and_training(tmp_path):
    paths = [saved_lora(tmp_path / f"a{i}", seed=i) for i in range(3)]
    adapters = [read_weights(p) for p in paths]
    model = dense_lm()
    glider = Glider(model, adapters, k=1)
    name, layer = next(iter(glider.layers.items()))
    x = torch.randn(5, layer.base.in_features)
    with torch.no_grad():
        layer.protos.normal_()
    layer.gate_expert = 1  # training form: W x + sigmoid(v_1 . x) s_1 B_1 A_1 x
    a, b = adapters[1].modules[name]
    expected = layer.base(x) + torch.sigmoid(x @ layer.protos[1]).unsqueeze(1) * adapters[1].scaling * (x @ a.T @ b.T)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.gate_expert = None
    pool_before = {n: t.clone() for n, t in model.state_dict().items() if "protos" not in n}
    losses = glider.train_gates({2: torch.randint(3, 90, (8, 12))}, steps=3, lr=0.1, batch_size=4, progress=False)
    assert set(losses) == {2}
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in pool_before.items())  # base, experts, buffers unchanged
    for layer in glider.layers.values():
        assert layer.local == "gates" and not layer.protos.requires_grad
        assert float(layer.protos[2].abs().sum()) > 0 and float(layer.protos[[0, 1]].abs().sum()) == 0
    glider.set_global(np.zeros(3))
    xs = torch.randn(4, layer.base.in_features)
    expected = (torch.nn.functional.normalize(xs, dim=-1) @ torch.nn.functional.normalize(layer.protos, dim=-1).T)
    assert torch.equal(layer.weights(xs).argmax(-1), expected.argmax(-1))  # gates: signed cosine
    assert all(p.requires_grad for n, p in model.named_parameters() if ".pool." in n)
    glider.detach()


def test_prompt_expert_trains_the_prompt_only():
    torch.manual_seed(0)
    model = dense_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.tensor([[5, 6, 7, 8] * 4] * 4)
    prompt = train_prompt(model, windows, n_tokens=3, steps=15, lr=0.1, batch_size=4, progress=False)
    assert prompt.shape == (3, model.config.hidden_size)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    from moekit.compose.loop import lm_loss

    with torch.no_grad():
        init = PromptedLM(model, model.get_input_embeddings().weight[:3].detach())
        assert float(lm_loss(PromptedLM(model, prompt), windows)) < float(lm_loss(init, windows))
        out = PromptedLM(model, prompt)(windows[:1]).logits
        embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(windows[:1])], dim=1)
        assert torch.allclose(out, model(inputs_embeds=embeds).logits[:, 3:], atol=1e-6)
