import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.core import routing as R
from moekit.core.routers import build_router
from moekit.errors import ConfigError, RoutingError, ShapeError, UnknownNameError
from reference import ref_deepseek_v2, ref_deepseek_v3, ref_softmax_topk, ref_topk_softmax


@st.composite
def logits_and_k(draw, max_experts=64):
    num_experts = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # distinct values: ties would make the choice among equals implementation-defined
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64) * 3
    return logits, k


def same_selection(indices, weights, ref_indices, ref_weights):
    """Compare as sets of (expert, weight) per token: slot order is not part of the contract."""
    assert indices.shape == ref_indices.shape
    for t in range(indices.shape[0]):
        got = dict(zip(indices[t].tolist(), weights[t].double().tolist(), strict=True))
        want = dict(zip(ref_indices[t].tolist(), ref_weights[t].tolist(), strict=True))
        assert got.keys() == want.keys()
        for e in got:
            assert got[e] == pytest.approx(want[e], rel=1e-5, abs=1e-7)


@given(logits_and_k(), st.booleans())
def test_softmax_topk_matches_reference(lk, normalize):
    logits, k = lk
    r = R.softmax_topk(logits, k, normalize)
    same_selection(r.indices, r.weights, *reversed(ref_softmax_topk(logits, k, normalize)))


@given(logits_and_k())
def test_topk_softmax_matches_reference(lk):
    logits, k = lk
    r = R.topk_softmax(logits, k)
    same_selection(r.indices, r.weights, *reversed(ref_topk_softmax(logits, k)))


@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_deepseek_v3_matches_reference(n_group, group_size, data):
    num_experts = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * group_size))
    normalize = data.draw(st.booleans())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    logits = torch.randn(7, num_experts, generator=g, dtype=torch.float64)
    bias = torch.randn(num_experts, generator=g, dtype=torch.float64) * 0.3
    r = R.sigmoid_group_topk(logits, k, bias, n_group, topk_group, normalize, 2.5)
    ref_w, ref_i = ref_deepseek_v3(logits, k, bias, n_group, topk_group, normalize, 2.5)
    same_selection(r.indices, r.weights, ref_i, ref_w)


@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["greedy", "group_limited_greedy"]), st.data())
def test_deepseek_v2_matches_reference(n_group, group_size, method, data):
    num_experts = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * group_size))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    logits = torch.randn(7, num_experts, generator=g, dtype=torch.float64)
    r = R.softmax_group_topk(logits, k, method, n_group, topk_group, scaling=1.5)
    ref_w, ref_i = ref_deepseek_v2(logits, k, method, n_group, topk_group, 1.5)
    same_selection(r.indices, r.weights, ref_i, ref_w)


def test_hand_built_softmax_topk():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    r = R.softmax_topk(logits, 2, normalize=False)
    assert r.indices.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.6, 0.3], [0.5, 0.3]]))
    r = R.softmax_topk(logits, 2, normalize=True)
    torch.testing.assert_close(r.weights, torch.tensor([[2 / 3, 1 / 3], [0.5 / 0.8, 0.3 / 0.8]]))


def test_hand_built_topk_softmax_ignores_other_logits():
    # softmax over the kept two logits only: exp(2)/(exp(2)+exp(1)) whatever the third logit is
    for third in (-5.0, 0.5):
        r = R.topk_softmax(torch.tensor([[2.0, 1.0, third]]), 2)
        assert r.indices.tolist() == [[0, 1]]
        torch.testing.assert_close(r.weights, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_deepseek_v3_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = R.sigmoid_group_topk(logits, 1, None, normalize=False)
    assert plain.indices.tolist() == [[0]]
    biased = R.sigmoid_group_topk(logits, 1, torch.tensor([0.0, 0.0, 0.0, 5.0]), normalize=False)
    assert biased.indices.tolist() == [[3]]
    torch.testing.assert_close(biased.weights, torch.sigmoid(torch.tensor([[-1.0]])))


def test_deepseek_v3_group_limit_excludes_other_groups():
    # group 0 = experts 0,1 (scores high, high); group 1 = experts 2,3 (one very high, one very low)
    logits = torch.tensor([[3.0, 3.0, 4.0, -9.0]])
    r = R.sigmoid_group_topk(logits, 1, None, n_group=2, topk_group=1)
    assert r.indices.tolist() in ([[0]], [[1]])  # expert 2 is best alone but its group loses on top-2 sum
    assert R.sigmoid_group_topk(logits, 1, None).indices.tolist() == [[2]]


def test_deepseek_v2_group_limited_uses_group_max():
    logits = torch.tensor([[3.0, 3.0, 4.0, -9.0]])
    r = R.softmax_group_topk(logits, 1, "group_limited_greedy", n_group=2, topk_group=1)
    assert r.indices.tolist() == [[2]]  # group score is the max: group 1 wins


def test_variable_k_mask_counts():
    r = R.Routing(torch.zeros(2, 3), torch.tensor([[0.7, 0.3], [1.0, 0.0]]), torch.tensor([[0, 2], [1, 0]]),
                  mask=torch.tensor([[True, True], [True, False]]))
    assert r.experts_per_token().tolist() == [2, 1]
    assert r.counts().tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", ["topk", "topk_softmax", "deepseek_v3", "deepseek_v2"])
def test_routers_registered_and_callable(name):
    router = build_router(name, 16, 8, 2)
    r = router(torch.randn(5, 16))
    assert r.indices.shape == (5, 2) and r.weights.shape == (5, 2) and r.logits.shape == (5, 8)
    assert router.weight.shape == (8, 16)


def test_router_jitter_only_in_training():
    torch.manual_seed(0)
    router = build_router("topk", 16, 8, 2, {"jitter": 0.5})
    x = torch.randn(4, 16)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_router_errors():
    with pytest.raises(UnknownNameError, match="router='nope'.*topk"):
        build_router("nope", 4, 4, 1)
    with pytest.raises(ConfigError, match="k=5: expected an integer from 1 to num_experts=4"):
        build_router("topk", 4, 4, 5)
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        build_router("topk", 4, 4, 1, {"colour": 1})
    with pytest.raises(ConfigError, match="n_group=3"):
        build_router("deepseek_v3", 4, 4, 1, {"n_group": 3})
    router = build_router("topk", 4, 4, 1)
    with pytest.raises(ShapeError, match=r"expected shape \[T, 4\]"):
        router(torch.randn(3, 5))
    with torch.no_grad():
        router.weight[0, 0] = float("nan")
    with pytest.raises(RoutingError, match="NaN"):
        router(torch.randn(3, 4))
