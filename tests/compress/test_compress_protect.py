"""Super experts for --protect-super, found as `moekit inspect` finds them: a planted outlier expert the model's
own text depends on is confirmed by ablation and protected; the same outlier on text it does not help is reported
but not protected; every method keeps the experts it is told to protect."""

from __future__ import annotations

import warnings

import pytest
import torch

import moekit.compress as mc
import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.compress.calibrate import CalibrationWarning
from moekit.data import TextDoc


class _Words:
    """Text is whitespace-separated token ids."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):  # noqa: ARG002 (the transformers signature)
        return [int(w) for w in text.split()]


def _planted():
    """A tiny model whose expert 4 of layer 0 outputs 100x what it did: a planted outlier."""
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        mh.view(model)[0].experts.down_proj[4] *= 100.0
    return model


def _docs(seqs):
    return [TextDoc(" ".join(map(str, s)), None, f"doc{n}") for n, s in enumerate(seqs)]


@torch.no_grad()
def _greedy(model, start: list[int], length: int) -> list[int]:
    ids = list(start)
    while len(ids) < length:
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _random(n: int, length: int = 40):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for _ in range(n)]


def test_an_outlier_the_models_own_text_depends_on_is_protected():
    model = _planted()
    docs = _docs([_greedy(model, s[:4], 40) for s in _random(6)])  # text the planted model itself writes
    protect, found = mc.find_super_experts(model, docs, _Words(), progress=False)
    assert protect == {0: [4]}
    assert [(r["layer"], r["expert"], r["protected"]) for r in found] == [(0, 4, True)]
    assert found[0]["ablation_loss_delta"] > found[0]["ordinary_loss_delta"]


def test_an_outlier_that_only_hurts_is_reported_not_protected():
    model = _planted()
    protect, found = mc.find_super_experts(model, _docs(_random(6)), _Words(), progress=False)
    assert protect == {}
    assert [(r["layer"], r["expert"], r["protected"]) for r in found] == [(0, 4, False)]
    assert found[0]["ablation_loss_delta"] < 0  # removing it helps on text it does not produce


def _stats(model):
    g = torch.Generator().manual_seed(0)
    windows = [(torch.randint(3, 97, (24,), generator=g), None) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return mc.calibrate(model, windows, grads=True, progress=False)


@pytest.mark.parametrize("method", ["frequency", "tcess", "reconstruct", "msmoe", "submoe", "dern", "heapr"])
def test_every_method_keeps_the_protected_experts(method):
    model = tiny_model("qwen3_moe")
    stats = _stats(model)
    least = {s.layer: int(s.counts().argmin()) for s in stats.layers}  # the first to go without protection
    unprotected = mc.plan(model, stats, method, 0.5)
    if method == "heapr":
        assert any(len(entry["neurons"][least[layer]]) < 20 for layer, entry in unprotected.layers.items())
    else:
        assert any(least[layer] not in entry["keep"] for layer, entry in unprotected.layers.items())
    protect = {layer: [e] for layer, e in least.items()}
    p = mc.plan(model, stats, method, 0.5, protect=protect)
    assert p.options["protected"] == protect
    for layer, entry in p.layers.items():
        e = least[layer]
        assert e in entry["keep"]
        if "groups" in entry:  # merged into by no one
            assert [e] in entry["groups"]
        if method == "heapr":  # every neuron kept
            assert entry["neurons"][e] == list(range(20))
