"""The autotuner (moekit.core.tune): it picks the fastest candidate by (injected, fake) timings, keeps and reuses the
choice on disk, ignores a corrupt or foreign cache with one warning, is off under MOEKIT_TUNE=0; and whatever it
picks, dispatch and `linear` still equal tests/reference.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moekit.core import tune
from moekit.core.dispatch import candidate_impls, dispatch, plan_dispatch, shape_class
from moekit.core.experts import Experts, linear
from moekit.core.routing import Routing
from reference import ref_moe


class FakeTimings:
    """A `measure` that returns fixed milliseconds per candidate name and records what it was asked to time."""

    def __init__(self, ms: dict[str, float]):
        self.ms, self.calls = ms, []

    def __call__(self, fns):
        self.calls.append(sorted(fns))
        for fn in fns.values():  # every candidate must run (and not fail) on the real input
            fn()
        return {name: self.ms.get(name, 100.0) for name in fns}


@pytest.fixture
def tuning_on(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEKIT_TUNE", "1")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    yield tmp_path
    tune.set_tuner(None)


def noop():
    return None


@pytest.mark.usefixtures("tuning_on")
def test_picks_fastest_and_reuses_it_from_disk():
    fake = FakeTimings({"a": 3.0, "b": 1.0, "c": 2.0})
    t = tune.Tuner(measure=fake)
    assert t.choose("k", (1, "x"), {"a": noop, "b": noop, "c": noop}) == "b"
    assert t.choose("k", (1, "x"), {"a": noop, "b": noop, "c": noop}) == "b"
    assert fake.calls == [["a", "b", "c"]]  # measured once
    data = json.loads(t.path().read_text())
    assert data["machine"] == tune.machine_key() and data["choices"]["k|1|x"]["impl"] == "b"

    def never(_fns):
        raise AssertionError("a cached choice must not be measured again")

    fresh = tune.Tuner(measure=never)  # another process: reads the file
    assert fresh.choose("k", (1, "x"), {"a": noop, "b": noop, "c": noop}) == "b"
    # a different shape class is measured on its own
    assert tune.Tuner(measure=FakeTimings({"a": 0.5})).choose("k", (2, "x"), {"a": noop, "b": noop}) == "a"


@pytest.mark.usefixtures("tuning_on")
@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "moekit-tune", "version": 1}),
                                     json.dumps([1, 2])])
def test_corrupt_cache_is_ignored_with_one_warning(content):
    t = tune.Tuner(measure=FakeTimings({"b": 1.0}))
    t.path().parent.mkdir(parents=True, exist_ok=True)
    t.path().write_text(content)
    with pytest.warns(tune.TuneCacheWarning, match="corrupt|another machine") as record:
        assert t.choose("k", (1,), {"a": noop, "b": noop}) == "b"
        assert t.choose("k", (2,), {"a": noop, "b": noop}) == "b"
    assert len(record) == 1
    assert json.loads(t.path().read_text())["choices"]["k|1"]["impl"] == "b"  # replaced by a valid file


@pytest.mark.usefixtures("tuning_on")
@pytest.mark.parametrize("field,value", [("cpu", "Some Other CPU"), ("torch", "0.0.1"), ("threads", 977)])
def test_foreign_cache_is_never_trusted(field, value):
    t = tune.Tuner(measure=FakeTimings({"b": 1.0}))
    machine = {**tune.machine_key(), field: value}
    t.path().parent.mkdir(parents=True, exist_ok=True)
    t.path().write_text(json.dumps({"format": "moekit-tune", "version": 1, "machine": machine,
                                    "choices": {"k|1": {"impl": "a", "ms": {"a": 0.1, "b": 9.0}}}}))
    with pytest.warns(tune.TuneCacheWarning, match="another machine"):
        assert t.choose("k", (1,), {"a": noop, "b": noop}) == "b"


def test_off_means_default_and_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEKIT_TUNE", "0")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    fake = FakeTimings({"a": 1.0})
    t = tune.Tuner(measure=fake)
    assert t.choose("k", (1,), {"a": noop, "b": noop}, default="b") == "b"
    assert fake.calls == [] and not any(tmp_path.iterdir())


@pytest.mark.usefixtures("tuning_on")
def test_suspended_thread_uses_cache_or_default():
    fake = FakeTimings({"a": 1.0})
    t = tune.Tuner(measure=fake)
    with tune.suspended():
        assert t.choose("k", (1,), {"a": noop, "b": noop}, default="b") == "b"
    assert fake.calls == []
    assert t.choose("k", (1,), {"a": noop, "b": noop}, default="b") == "a"
    with tune.suspended():
        assert t.choose("k", (1,), {"a": noop, "b": noop}, default="b") == "a"


def test_measure_ms_medians_every_candidate():
    ms = tune.measure_ms({"a": noop, "b": lambda: torch.ones(64, 64) @ torch.ones(64, 64)}, budget_ms=5)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_cpu_info_and_bucket():
    info = tune.cpu_info()
    assert isinstance(info["cpu"], str) and info["cpu"] and isinstance(info["cpu_flags"], list)
    assert [tune.bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000)] == [1, 1, 2, 4, 4, 8, 1024]


def _routing(x: torch.Tensor, num_experts: int, k: int) -> Routing:
    logits = torch.randn(x.shape[0], num_experts)
    weights, indices = torch.softmax(logits, -1).topk(k)
    return Routing(logits, weights, indices)


@given(winner=st.sampled_from(["loop", "grouped_mm", "threads"]), num_tokens=st.integers(1, 20),
       activation=st.sampled_from(["swiglu", "gpt_oss", "gelu"]), transposed=st.booleans(), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_every_tuned_dispatch_choice_matches_reference(winner, num_tokens, activation, transposed, seed, dtype):
    """Through impl="auto" with tuning on, whichever implementation the tuner picks equals the reference."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_TUNE", "1")
        fake = FakeTimings({winner: 0.1})
        old = tune.set_tuner(tune.Tuner(measure=fake, persist=False))
        try:
            torch.manual_seed(seed)
            experts = Experts(6, 16, 8, activation, bias=True, transposed=transposed, dtype=dtype)
            with torch.no_grad():
                experts.gate_up_proj_bias.normal_()
                experts.down_proj_bias.normal_()
            x = torch.randn(num_tokens, 16, dtype=dtype)
            r = _routing(x, 6, 2)
            plan = plan_dispatch(r, 6)
            with torch.no_grad():
                got = dispatch(x, plan, experts, "auto")
            xs = x.index_select(0, plan.token)
            candidates = candidate_impls(xs, experts)
            shape = shape_class(xs, experts, len(set(plan.expert.tolist())), candidates)
            if len(candidates) > 1:
                assert sorted(candidates) in fake.calls  # (small-row products inside are tuned too)
                chosen = tune.tuner().cached("dispatch", shape)
                assert chosen == (winner if winner in candidates else candidates[0])
            atol = 1e-4 if dtype == torch.float32 else 3e-2
            want = ref_moe(x.float(), r.indices, r.weights.double(), experts)
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol)
        finally:
            tune.set_tuner(old)


@pytest.mark.usefixtures("tuning_on")
@pytest.mark.parametrize("winner", ["x_wt", "w_xt"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_linear_either_choice_equals_f_linear(winner, rows):
    fake = FakeTimings({winner: 0.1})
    tune.set_tuner(tune.Tuner(measure=fake))
    torch.manual_seed(rows)
    w, b = torch.randn(12, 7), torch.randn(12)
    x = torch.randn(rows, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
        torch.testing.assert_close(linear(x, w.t().contiguous().t()), F.linear(x, w))
    if rows in tune.SMALL_ROWS:
        assert tune.small_linear_transposed(x, w) == (winner == "w_xt")
        assert fake.calls and fake.calls[0] == ["w_xt", "x_wt"]
    else:
        assert fake.calls == []


def test_measuring_the_threads_path_does_not_deadlock(monkeypatch):
    """The threads candidate's workers read the tune cache while the main thread measures: no lock may be held."""
    import threading

    monkeypatch.setenv("MOEKIT_TUNE", "1")
    old_threads = torch.get_num_threads()
    old = tune.set_tuner(tune.Tuner(measure=FakeTimings({"threads": 0.1}), persist=False))
    torch.set_num_threads(2)
    try:
        experts = Experts(4, 16, 8)
        x = torch.randn(6, 16)
        plan = plan_dispatch(_routing(x, 4, 2), 4)
        done = threading.Event()

        def run():
            with torch.no_grad():
                dispatch(x, plan, experts, "auto")
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(60), "dispatch with tuning on did not finish: deadlock"
    finally:
        torch.set_num_threads(old_threads)
        tune.set_tuner(old)
