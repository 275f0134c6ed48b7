"""Every registry name builds as `MoE(router=NAME)`, trains through the dispatch, reports its losses, sends
gradients where its paper says, and variable-k routers dispatch as the per-token reference says."""

import pytest
import torch

import moekit
from moekit import MoE
from reference import ref_moe

NAMES = ["topk", "top_p", "null_experts", "expert_choice", "hash", "random", "smoe_dropout", "sinkhorn", "recurrent",
         "chain", "weak_strong", "small_big_skip", "film", "thor", "sparse_ot", "moe_x"]
# router parameters that must get no gradient (fixed or absent routers), by name
NO_ROUTER_GRAD = {"hash", "random", "smoe_dropout", "thor", "moe_x"}  # moe_x routes through its experts' encoders
PAPER_LOSSES = {"top_p": {"entropy", "balance"}, "null_experts": {"balance"}, "random": {"consistency"},
                "weak_strong": {"strong_use", "balance"}, "small_big_skip": {"compute", "balance"}}
VARIABLE_K = {"top_p": {}, "null_experts": {}, "expert_choice": {}, "sinkhorn": {"capacity_factor": 0.8}}


def test_every_name_is_registered():
    assert set(NAMES) <= set(moekit.router_names())


@pytest.mark.parametrize("name", NAMES)
def test_trains_forward_and_backward_with_defaults(name):
    torch.manual_seed(0)
    moe = MoE(hidden_size=16, intermediate_size=8, num_experts=4, router=name, num_shared_experts=1)
    x = torch.randn(2, 6, 16, requires_grad=True)
    ids = torch.randint(0, 50, (2, 6))
    out = moe(x, token_ids=ids)
    assert out.hidden.shape == x.shape and torch.isfinite(out.hidden).all()
    assert PAPER_LOSSES.get(name, set()) <= set(out.losses)
    assert ("balance" in out.losses) == (name not in {"expert_choice", "hash", "random", "smoe_dropout", "sinkhorn",
                                                      "thor", "sparse_ot"})
    (out.hidden.square().mean() + out.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    router_grads = [p.grad for n, p in moe.router.named_parameters() if n in ("weight", "bias")]
    if name in NO_ROUTER_GRAD:
        assert router_grads == []  # nothing to train: no parameter, or a fixed buffer
    else:
        assert router_grads and router_grads[0] is not None and router_grads[0].abs().sum() > 0
    expert_grad = next(iter(moe.experts.parameters())).grad
    assert expert_grad is not None and expert_grad.abs().sum() > 0
    moe.eval()
    with torch.no_grad():
        assert moe(x, token_ids=ids).hidden.shape == x.shape


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("name", VARIABLE_K)
def test_variable_k_dispatch_matches_the_per_token_reference(name, impl):
    torch.manual_seed(1)
    moe = MoE(16, 8, 6, k=2, router=name, router_options=VARIABLE_K[name], dispatch=impl).eval()
    x = torch.randn(70, 16) * 2
    with torch.no_grad():
        out = moe(x)
    r = out.routing
    assert r.mask is not None and int(r.mask.sum()) < r.mask.numel()  # some slots really are padding
    want = ref_moe(x, r.indices, r.weights.double(), moe.experts, mask=r.mask)
    torch.testing.assert_close(out.hidden.double(), want, atol=1e-5, rtol=1e-5)
    assert int(out.expert_counts.sum()) == int(r.mask.sum())


def test_top_p_gives_tokens_different_numbers_of_experts():
    torch.manual_seed(2)
    moe = MoE(16, 8, 8, router="top_p", router_options={"p": 0.5})
    with torch.no_grad():
        moe.router.weight.mul_(2)
        per_token = moe(torch.randn(200, 16)).routing.experts_per_token()
    assert len(set(per_token.tolist())) >= 3


def test_smoe_dropout_accuracy_improves_with_k_at_inference():
    """Trained with k growing 1 -> E on a fixed random router, the layer gets better as k grows at inference."""
    torch.manual_seed(0)
    num_classes, steps, dim = 4, 60, 16
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, num_classes))
    x_train, x_test = torch.randn(256, dim), torch.randn(512, dim)
    with torch.no_grad():
        y_train, y_test = teacher(x_train).argmax(-1), teacher(x_test).argmax(-1)
    moe = MoE(dim, 4, 8, k=1, router="smoe_dropout", router_options={"k_start": 1, "k_end": 8})
    head = torch.nn.Linear(dim, num_classes)
    opt = torch.optim.Adam([*moe.parameters(), *head.parameters()], lr=2e-2)
    for step in range(steps):
        moe.set_step(step, steps)
        loss = torch.nn.functional.cross_entropy(head(moe(x_train).hidden), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe.eval()
    with torch.no_grad():
        acc = {k: float((head(moe(x_test, k=k).hidden).argmax(-1) == y_test).float().mean()) for k in (1, 2, 4, 8)}
    assert acc[1] < acc[2] < acc[4] <= acc[8] + 0.01, acc
    assert acc[8] - acc[1] > 0.1, acc


def test_token_ids_shape_and_step_hook_on_any_router():
    from moekit.errors import ShapeError

    moe = MoE(8, 4, 4, router="hash")
    with pytest.raises(ShapeError, match="token_ids: expected one id per token"):
        moe(torch.randn(2, 3, 8), token_ids=torch.zeros(5, dtype=torch.long))
    plain = MoE(8, 4, 4)
    plain.set_step(3, 10)  # no schedule: nothing changes
    assert plain(torch.randn(3, 8), token_ids=torch.arange(3)).routing.k == 2
