"""reroute / unroute / scmoe on tiny models of the families: each change against the family's own computation or
against the routing and the score combination written out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import tiny_model

import moekit.hf as mh
from moekit.errors import ConfigError
from moekit.hf.reroute import experts_per_token, reroute, scmoe_generate, scmoe_logits, unroute


def _ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


class Capture:
    """Records each router's input and what each experts module was given (indices, weights)."""

    def __init__(self, model):
        self.router_in, self.experts_in, self.handles = [], [], []
        for v in mh.view(model):
            self.handles.append(v.router.register_forward_pre_hook(self._router))
            self.handles.append(v.experts.module.register_forward_pre_hook(self._experts))

    def _router(self, module, args):  # noqa: ARG002
        self.router_in.append(args[0].reshape(-1, args[0].shape[-1]))

    def _experts(self, module, args):  # noqa: ARG002
        self.experts_in.append((args[1], args[2]))

    def close(self):
        for h in self.handles:
            h.remove()


def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def _selection(indices, weights):
    return [{int(i): float(w) for i, w in zip(ri, rw, strict=True) if w != 0} for ri, rw in
            zip(indices.tolist(), weights.tolist(), strict=True)]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                        "granitemoe", "gpt_oss"])
def test_changed_k_equals_the_model_built_with_that_k(model_type):
    model = tiny_model(model_type)
    ids = _ids()
    before = _logits(model, ids)
    want = _logits(tiny_model(model_type, num_experts_per_tok=3), ids)
    assert not torch.allclose(before, want, atol=1e-3)
    reroute(model, k=3)
    torch.testing.assert_close(_logits(model, ids), want, atol=2e-5, rtol=2e-5)
    assert experts_per_token(model) == [3.0] * len(mh.view(model))
    unroute(model)
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)
    assert experts_per_token(model) == [None] * len(mh.view(model))


@pytest.mark.parametrize(("model_type", "renormalised"), [("qwen3_moe", True), ("qwen2_moe", False)])
def test_top_p_keeps_the_fewest_experts_reaching_p(model_type, renormalised):
    model = tiny_model(model_type)
    reroute(model, top_p=0.5)
    cap = Capture(model)
    _logits(model, _ids())
    cap.close()
    counts = []
    for v, hidden, (indices, weights) in zip(mh.view(model), cap.router_in, cap.experts_in, strict=True):
        want = []
        for row in (hidden.double() @ v.router.weight.double().t()).tolist():
            p = _softmax(row)
            chosen, mass = {}, 0.0
            for e in sorted(range(len(p)), key=lambda e: -p[e]):
                chosen[e] = p[e]
                mass += p[e]
                if mass >= 0.5:
                    break
            total = sum(chosen.values())
            want.append({e: (w / total if renormalised else w) for e, w in chosen.items()})
        got = _selection(indices, weights)
        assert [sorted(g) for g in got] == [sorted(w) for w in want]
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-4)
        counts.append(sum(len(w) for w in want) / len(want))
    assert experts_per_token(model) == pytest.approx(counts)
    assert len({len(w) for w in want}) > 1  # the number of experts really varies


def test_skipping_without_renormalising_keeps_each_experts_own_weight():
    model = tiny_model("mixtral")
    ids = _ids()
    reroute(model, skip_threshold=0.6, renormalize=False)
    cap = Capture(model)
    _logits(model, ids)
    cap.close()
    v0 = mh.view(model)[0]
    p0 = [_softmax(r) for r in (cap.router_in[0].double() @ v0.router.weight.double().t()).tolist()]
    want = []
    for p in p0:  # Mixtral's top-2 weights, the second dropped (weight 0 slot) below 0.6 x the first, no rescaling
        first, second = sorted(range(len(p)), key=lambda e: -p[e])[:2]
        w1, w2 = p[first] / (p[first] + p[second]), p[second] / (p[first] + p[second])
        want.append({first: w1, second: w2} if p[second] / p[first] >= 0.6 else {first: w1})
    got = [{e: w for e, w in g.items() if w != 0} for g in _selection(*cap.experts_in[0])]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4)
    assert 1 in {len(w) for w in want} and 2 in {len(w) for w in want}


def test_dynamic_skipping_per_layer_thresholds():
    model = tiny_model("mixtral")
    ids = _ids()
    reroute(model, skip_threshold=[0.0, 0.6])
    cap = Capture(model)
    _logits(model, ids)
    cap.close()
    v0, v1 = mh.view(model)
    # layer 0, threshold 0: both experts of the family's own top-2
    p0 = [_softmax(r) for r in (cap.router_in[0].double() @ v0.router.weight.double().t()).tolist()]
    assert [len(s) for s in _selection(*cap.experts_in[0])] == [2] * len(p0)
    # layer 1, threshold 0.6: the second expert stays iff p2 / p1 >= 0.6; a lone expert gets weight 1
    p1 = [_softmax(r) for r in (cap.router_in[1].double() @ v1.router.weight.double().t()).tolist()]
    want = []
    for p in p1:
        first, second = sorted(range(len(p)), key=lambda e: -p[e])[:2]
        if p[second] / p[first] >= 0.6:
            want.append({first: p[first] / (p[first] + p[second]), second: p[second] / (p[first] + p[second])})
        else:
            want.append({first: 1.0})
    got = _selection(*cap.experts_in[1])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4)
    assert 1 in {len(w) for w in want} and 2 in {len(w) for w in want}
    assert experts_per_token(model) == pytest.approx([2.0, sum(len(w) for w in want) / len(want)])
    accelerated = _logits(mh.accelerate(model), ids)  # the experts run by moekit get the same routing
    mh.restore(model)
    torch.testing.assert_close(accelerated, _logits(model, ids), atol=2e-5, rtol=2e-5)


def _rank2_router(router):
    """Mixtral's router by hand, keeping only the expert ranked second, with weight 1."""

    def forward(hidden):
        hidden = hidden.reshape(-1, hidden.shape[-1])
        logits = hidden @ router.weight.t()
        second = torch.softmax(logits.float(), -1).topk(2, dim=-1).indices[:, 1:]
        return logits, torch.ones(second.shape, dtype=logits.dtype), second

    return forward


def test_scmoe_contrasts_strong_and_weak_activation():
    model = tiny_model("mixtral")
    ids = _ids()
    weak_model = copy.deepcopy(model)
    for v in mh.view(weak_model):
        v.router.forward = _rank2_router(v.router)
    strong = torch.log_softmax(_logits(model, ids), -1)
    weak = torch.log_softmax(_logits(weak_model, ids), -1)
    got = scmoe_logits(model, ids, beta=0.7, weak_rank=2, alpha=None)
    torch.testing.assert_close(got, strong - 0.7 * weak, atol=1e-5, rtol=1e-5)
    got = scmoe_logits(model, ids, beta=0.7, weak_rank=2, alpha=0.2)
    plausible = strong.exp() >= 0.2 * strong.exp().amax(-1, keepdim=True)
    assert torch.equal(torch.isfinite(got), plausible)
    torch.testing.assert_close(got[plausible], (strong - 0.7 * weak)[plausible], atol=1e-5, rtol=1e-5)
    # the model is left routing as before, and a reroute in place is kept
    torch.testing.assert_close(torch.log_softmax(_logits(model, ids), -1), strong, atol=0, rtol=0)
    reroute(model, k=3)
    scmoe_logits(model, ids)
    assert experts_per_token(model)[0] is not None
    out = scmoe_generate(unroute(model), ids[:1, :4], max_new_tokens=3, beta=0.7, alpha=None)
    step = scmoe_logits(model, ids[:1, :4], beta=0.7, alpha=None)[:, -1].argmax(-1)
    assert out.shape == (1, 7) and int(out[0, 4]) == int(step)


def test_bad_changes_are_refused():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ConfigError, match="skip_threshold: expected one value per MoE block"):
        reroute(model, skip_threshold=[0.1])
    with pytest.raises(ConfigError, match="skip_threshold=1.5"):
        reroute(model, skip_threshold=1.5)
    with pytest.raises(ConfigError, match="top_p=0"):
        reroute(model, top_p=0)
    with pytest.raises(ConfigError, match="k=7"):
        reroute(model, k=7)
    with pytest.raises(ConfigError, match="sparsemixer"):
        reroute(tiny_model("phimoe"), k=3)
    v = mh.view(model)[0]
    v.router.forward = lambda hidden: hidden  # noqa: ARG005
    with pytest.raises(ConfigError, match="already replaced"):
        reroute(model, k=1)
