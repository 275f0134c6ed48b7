from __future__ import annotations

import pytest
import torch

from hf.tiny import tiny_model
from moekit.adapt.reroute import reroute_online, route_logits
from moekit.errors import ConfigError
from moekit.hf import view
from moekit.hf.routing import reference_routing

IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 12, 7, 44, 3, 29]])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_zero_vectors_route_as_the_family_and_equal_the_model(family):
    model = tiny_model(family)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    block = view(model)[0]
    hidden = torch.randn(7, model.config.hidden_size)
    ref = reference_routing(block, hidden)
    got = route_logits(block, hidden, torch.zeros(block.num_experts))
    torch.testing.assert_close(got.weights, ref.weights)
    torch.testing.assert_close(got.indices, ref.indices)
    r = reroute_online(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    r.restore()


def test_restore_returns_the_model_exactly_after_a_fit():
    model = tiny_model("qwen3_moe")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    r = reroute_online(model, steps=3, lr=0.5)
    r.fit(IDS)
    assert any(v.abs().sum() > 0 for v in r.vectors().values())
    with torch.no_grad():
        assert not torch.equal(model(input_ids=IDS).logits, want)  # the shifts changed the routing
    r.restore()
    assert all("forward" not in b.router.__dict__ for b in view(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.requires_grad == flags[n], n  # weights frozen, flags back
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, want)


def test_fit_lowers_the_context_loss_and_only_in_chosen_layers():
    model = tiny_model("mixtral")
    r = reroute_online(model, layers=[1], steps=1, lr=0.3)
    first = r.fit(IDS)
    for _ in range(6):
        r.fit(IDS)
    r.steps = 1
    assert r.fit(IDS) < first
    assert list(r.vectors()) == [1]
    assert "forward" not in view(model)[0].router.__dict__
    r.restore()


def test_reg_pulls_the_vectors_toward_zero_and_is_not_in_the_returned_loss():
    def fitted(reg):
        model = tiny_model("deepseek_v3")
        r = reroute_online(model, steps=4, lr=0.05, reg=reg)
        for _ in range(8):  # refits accumulate: without the pull the shifts keep drifting
            r.fit(IDS)
        return model, r

    _, free = fitted(0.0)
    model, pulled = fitted(50.0)
    norm = lambda r: sum(float(v.norm()) for v in r.vectors().values())  # noqa: E731
    assert norm(pulled) < 0.5 * norm(free)
    with torch.no_grad():  # the next-token loss at the current shifts, without the penalty
        logits = model(input_ids=IDS).logits[0, :-1]
        want = float(torch.nn.functional.cross_entropy(logits, IDS[0, 1:]))
    pulled.steps = 1
    assert pulled.fit(IDS) == pytest.approx(want, rel=1e-5)
    free.restore()
    pulled.restore()


def test_generate_refits_every_interval():
    model = tiny_model("olmoe")
    r = reroute_online(model, interval=3, steps=1)
    out = r.generate(IDS[:, :5], max_new_tokens=7)
    assert out.shape == (1, 12) and r.fits == 3  # prefill, after 3, after 6
    r.restore()


def test_bad_arguments():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="interval"):
        reroute_online(model, interval=0)
    with pytest.raises(ConfigError, match="layers"):
        reroute_online(model, layers=[7])
    with pytest.raises(ConfigError, match="reg"):
        reroute_online(model, reg=-1.0)
    r = reroute_online(model)
    with pytest.raises(ConfigError, match="already replaced"):
        reroute_online(model)
    with pytest.raises(ConfigError, match="2 tokens"):
        r.fit(IDS[:, :1])
    r.restore()


def test_adapted_perplexity_scores_the_same_tokens_and_leaves_the_model(capsys):
    from moekit.adapt.reroute_eval import adapted_perplexity
    from moekit.cli.main import main
    from moekit.data import TextDoc
    from moekit.eval import perplexity

    class Tok:
        eos_token_id = 2

        def encode(self, text, **_):
            return [3 + (ord(c) % 90) for c in text]

    model = tiny_model("qwen3_moe")
    docs = [TextDoc("the quick brown fox jumps over the lazy dog " * 3, None, "test")]
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    out = adapted_perplexity(model, Tok(), docs, interval=16, seq_len=64, steps=1, progress=False)
    plain = perplexity(model, Tok(), docs, seq_len=64, stride=16, progress=False)
    assert out["tokens"] == plain["tokens"] and out["fits"] >= 2
    assert out["ppl"] > 1 and out["ppl_adapted"] > 1
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, want)
    assert main(["eval", "--adapt-routing", "--adapt-interval", "0"]) == 2
    assert "--adapt-interval=0" in capsys.readouterr().err
