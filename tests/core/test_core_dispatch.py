import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoE
from moekit.core.dispatch import capacity_for, dispatch, plan_dispatch
from moekit.core.experts import Experts
from moekit.core.routing import Routing
from moekit.errors import ConfigError, RoutingError
from reference import ref_keep, ref_moe

ROUTERS = ["topk", "topk_softmax", "deepseek_v3", "deepseek_v2"]
ACTS = ["swiglu", "geglu", "gelu", "gpt_oss"]


def check_against_reference(moe, x, out, atol):
    r = out.routing
    capacity = None
    if moe.capacity_factor is not None:
        capacity = capacity_for(r.num_tokens, r.k, moe.num_experts, moe.capacity_factor)
    want = ref_moe(x.reshape(-1, x.shape[-1]), r.indices, r.weights.double(), moe.experts, capacity,
                   shared=moe.shared_experts)
    got = out.hidden.reshape(-1, x.shape[-1]).double()
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    keep = ref_keep(r.indices, capacity)
    assert out.dropped == int((~keep).sum())
    assert out.expert_counts.tolist() == torch.bincount(r.indices[keep], minlength=moe.num_experts).tolist()


@given(
    num_experts=st.integers(1, 64),
    data=st.data(),
    num_tokens=st.integers(0, 24),
    router=st.sampled_from(ROUTERS),
    activation=st.sampled_from(ACTS),
    impl=st.sampled_from(["loop", "grouped_mm", "threads", "auto"]),
    capacity=st.sampled_from([None, 0.25, 0.5, 1.0, 2.0]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_moe_matches_reference_fp32(num_experts, data, num_tokens, router, activation, impl, capacity, bias, seed):
    k = data.draw(st.integers(1, num_experts))
    torch.manual_seed(seed)
    moe = MoE(12, 6, num_experts, k=k, router=router, activation=activation, capacity_factor=capacity, bias=bias,
              dispatch=impl)
    if bias:
        with torch.no_grad():
            moe.experts.gate_up_proj_bias.normal_()
            moe.experts.down_proj_bias.normal_()
    x = torch.randn(num_tokens, 12) * 2
    with torch.no_grad():  # inference, so that "threads" runs threaded; gradients are checked below
        out = moe(x)
    check_against_reference(moe, x, out, atol=1e-4)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "threads"])
def test_every_impl_runs_under_inference_mode(impl):
    """Inference mode is thread-local: the thread pool's workers write into tensors the caller made under it."""
    torch.manual_seed(0)
    moe = MoE(12, 6, 4, k=2, dispatch=impl)
    x = torch.randn(16, 12)
    with torch.inference_mode():
        out = moe(x)
    check_against_reference(moe, x, out, atol=1e-4)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("activation", ACTS)
def test_moe_matches_reference_bf16(router, activation):
    for impl in ("loop", "grouped_mm", "threads"):
        torch.manual_seed(0)
        moe = MoE(32, 16, 8, k=2, router=router, activation=activation, num_shared_experts=1, dispatch=impl,
                  dtype=torch.bfloat16)
        x = torch.randn(2, 20, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            out = moe(x)
        assert out.hidden.dtype == torch.bfloat16 and out.hidden.shape == x.shape
        # bf16 has 8 mantissa bits: allow ~2% of the output scale
        check_against_reference(moe, x.float(), out, atol=2e-2)


@pytest.mark.parametrize("activation", ACTS)
def test_moe_float64(activation):
    torch.manual_seed(1)
    moe = MoE(10, 4, 5, k=3, activation=activation, num_shared_experts=2, shared_gate=True, dtype=torch.float64)
    x = torch.randn(9, 10, dtype=torch.float64)
    check_against_reference(moe, x, moe(x), atol=1e-10)


def test_transposed_experts_match_reference():
    torch.manual_seed(2)
    experts = Experts(6, 10, 4, "gpt_oss", bias=True, transposed=True)
    assert experts.gate_up_proj.shape == (6, 10, 8) and experts.down_proj.shape == (6, 4, 10)
    with torch.no_grad():
        experts.gate_up_proj_bias.normal_()
        experts.down_proj_bias.normal_()
    x = torch.randn(15, 10)
    logits = torch.randn(15, 6)
    weights, indices = torch.softmax(logits, -1).topk(2)
    r = Routing(logits, weights, indices)
    for impl in ("loop", "grouped_mm", "threads"):
        with torch.no_grad():
            got = dispatch(x, plan_dispatch(r, 6), experts, impl)
        torch.testing.assert_close(got.double(), ref_moe(x, indices, weights.double(), experts), atol=1e-4, rtol=1e-4)


def test_variable_k_mask_dispatch_matches_reference():
    torch.manual_seed(3)
    experts = Experts(7, 8, 5)
    x = torch.randn(11, 8)
    logits = torch.randn(11, 7)
    weights, indices = torch.softmax(logits, -1).topk(4)
    mask = torch.rand(11, 4) < 0.6
    mask[:, 0] = True
    weights = weights * mask
    r = Routing(logits, weights, indices, mask=mask)
    for impl in ("loop", "grouped_mm", "threads"):
        for capacity in (None, 2):
            plan = plan_dispatch(r, 7, capacity)
            with torch.no_grad():
                got = dispatch(x, plan, experts, impl)
            want = ref_moe(x, indices, weights.double(), experts, capacity, mask=mask)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            assert plan.token.numel() == int(ref_keep(indices, capacity, mask).sum())


def test_zero_tokens_and_idle_experts():
    moe = MoE(8, 4, 64, k=1)
    out = moe(torch.randn(0, 8))
    assert out.hidden.shape == (0, 8) and out.expert_counts.sum() == 0 and out.aux_loss == 0
    out = moe(torch.randn(3, 8))
    assert int((out.expert_counts > 0).sum()) <= 3
    out.hidden.sum().backward()  # experts with no token get a zero gradient, not an error
    assert moe.experts.gate_up_proj.grad.shape == moe.experts.gate_up_proj.shape


def test_capacity_drops_in_priority_order():
    # 4 tokens all prefer expert 0 first, expert 1 second; capacity 2 -> first choices of tokens 0,1 kept
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 4)
    weights, indices = torch.softmax(logits, -1).topk(2)
    plan = plan_dispatch(Routing(logits, weights, indices), 3, capacity=2)
    kept = sorted(zip(plan.expert.tolist(), plan.token.tolist(), strict=True))
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert plan.dropped == 4
    assert capacity_for(4, 2, 3, 0.75) == 2


@pytest.mark.parametrize("router,impl", [(r, "loop") for r in ROUTERS] + [("topk", "threads")])
def test_gradients_float64_gradcheck(router, impl):
    torch.manual_seed(4)
    moe = MoE(6, 3, 4, k=2, router=router, num_shared_experts=1, dtype=torch.float64, dispatch=impl)
    moe.router.double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    names = ["experts.gate_up_proj", "experts.down_proj", "router.weight", "shared_experts.up_proj.weight"]
    params = [dict(moe.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return torch.func.functional_call(moe, dict(zip(names, ps, strict=True)), (x,)).hidden

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl,activation", [("grouped_mm", "swiglu"), ("threads", "swiglu"),
                                             ("threads", "gpt_oss")])
def test_fast_and_loop_gradients_agree_with_stride0_grad(impl, activation):
    torch.manual_seed(5)
    a = MoE(16, 8, 6, k=2, dispatch=impl, bias=True, activation=activation)
    b = MoE(16, 8, 6, k=2, dispatch="loop", bias=True, activation=activation)
    b.load_state_dict(a.state_dict())
    x = torch.randn(40, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).hidden.sum().backward()  # .sum() hands backward a stride-0 gradient
    b(xb).hidden.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_tokens", [30, 2])
def test_threaded_transposed_experts_gradients_match_loop(num_tokens):
    torch.manual_seed(6)
    experts = Experts(5, 8, 4, "gpt_oss", bias=True, transposed=True)
    x = torch.randn(num_tokens, 8)
    logits = torch.randn(num_tokens, 5)
    weights, indices = torch.softmax(logits, -1).topk(2)
    plan = plan_dispatch(Routing(logits, weights, indices), 5)
    idle = [e for e, n in enumerate(plan.counts) if n == 0]
    assert (num_tokens == 2) == bool(idle)
    grads = []
    for impl in ("loop", "threads"):
        experts.zero_grad()
        dispatch(x, plan, experts, impl).square().sum().backward()
        grads.append([p.grad.clone() for p in experts.parameters()])
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
        assert not gb[idle].any()  # experts that got no token get exactly zero gradient


def test_work_groups_cover_every_row_once():
    from moekit.core.dispatch import DispatchPlan, _work_groups

    plan = DispatchPlan(torch.zeros(0), torch.zeros(0), torch.zeros(0), [100, 0, 3, 1, 40], 0)
    for split in (True, False):
        groups = _work_groups(plan, 3, split)
        rows = sorted(r for g in groups for _, s, t in g for r in range(s, t))
        assert rows == list(range(144))
        if not split:  # whole experts
            assert sorted(t - s for g in groups for _, s, t in g) == [1, 3, 40, 100]
    loads = [sum(t - s for _, s, t in g) for g in _work_groups(plan, 3, True)]
    assert max(loads) <= 48 + 8  # the 100-row expert was cut into shares of ceil(144 / 3) = 48 rows


def test_dispatch_errors():
    experts = Experts(3, 4, 2)
    r = Routing(torch.zeros(2, 3), torch.ones(2, 1), torch.tensor([[0], [3]]))
    with pytest.raises(RoutingError, match=r"expected expert ids in \[0, 3\)"):
        plan_dispatch(r, 3)
    with pytest.raises(ConfigError, match="dispatch='fast'"):
        dispatch(torch.randn(2, 4), plan_dispatch(Routing(torch.zeros(2, 3), torch.ones(2, 1),
                                                          torch.tensor([[0], [1]])), 3), experts, "fast")
    with pytest.raises(ConfigError, match="capacity_factor=0"):
        capacity_for(4, 1, 2, 0)
