"""Expert placement: the integer program against brute force and a hand-made optimum, the one-layer program and
the search against brute force, the lower bounds, EPLB replicas within memory, the simulator's bytes on
hand-computed cases, and `moekit place`'s errors."""

import itertools
import json

import numpy as np
import pytest

from checkpoints import v1_shaped_checkpoint
from moekit.cli.main import main
from moekit.serve.place import (
    PlacementError,
    RoutingCounts,
    add_replicas,
    capacities,
    contiguous,
    counts_from_indices,
    lower_bound,
    objective,
    place,
)
from moekit.serve.place_counts import kept_bound
from moekit.serve.place_program import layer_program
from moekit.serve.place_search import greedy, improve, swap_layer
from moekit.serve.simulate import CostModel, a2a_bytes, compare, simulate


def brute_force(counts: RoutingCounts, devices: int) -> float:
    """The optimal objective by enumerating every equal-count placement of every layer."""
    E = counts.num_experts
    cap = capacities(E, devices)
    layouts = [np.array(p) for p in set(itertools.permutations(np.repeat(np.arange(devices), cap)))]
    return min(objective(counts, np.stack(combo), devices)[0]
               for combo in itertools.product(layouts, repeat=counts.num_layers))


def random_counts(rng, layers=3, experts=4, tokens=60, k=2):
    idx = [np.stack([rng.choice(experts, k, replace=False, p=rng.dirichlet(np.ones(experts)))
                     for _ in range(tokens)]) for _ in range(layers)]
    return counts_from_indices(idx, experts), idx


def test_counts_hand_computed():
    # token 0: layer 0 -> {0, 1}, layer 1 -> {2, 3}; token 1: layer 0 -> {0, 2}, layer 1 -> {0, 2}
    idx = [np.array([[0, 1], [0, 2]]), np.array([[2, 3], [0, 2]])]
    c = counts_from_indices(idx, 4)
    np.testing.assert_array_equal(c.load, [[2, 1, 1, 0], [1, 0, 2, 1]])
    want = np.zeros((4, 4))
    want[0, 2] = want[0, 3] = want[1, 2] = want[1, 3] = 0.5  # token 0: 1/k_0 per pair
    want[0, 0] += 0.5
    want[0, 2] += 0.5
    want[2, 0] += 0.5
    want[2, 2] += 0.5
    np.testing.assert_allclose(c.deps[0], want)
    assert c.deps[0].sum() == c.load[1].sum()  # every layer-1 assignment counts once


def test_program_finds_the_hand_made_optimum():
    # balanced loads; expert i at layer 0 feeds expert 3 - i at layer 1 only: the optimum keeps every pair together
    load = np.full((2, 4), 10.0)
    deps = [np.fliplr(np.eye(4)) * 10]
    counts = RoutingCounts(load, deps, 40)
    p, info = place(counts, 2)
    assert info.method == "milp" and info.gap < 1e-6
    assert objective(counts, p.device, 2) == (40.0, 40.0, 0.0)  # 20 per device per layer, nothing crosses
    for i in range(4):
        assert p.device[0, i] == p.device[1, 3 - i]
    # contiguous puts 0, 1 with 0, 1 at layer 1, which are fed by 3, 2: everything crosses
    assert objective(counts, contiguous(4, 2, 2), 2) == (80.0, 40.0, 40.0)


@pytest.mark.parametrize(("seed", "experts", "devices"), [(0, 4, 2), (1, 4, 2), (2, 4, 2), (3, 4, 2), (4, 5, 2),
                                                          (5, 6, 3), (6, 4, 4)])
def test_program_matches_brute_force_and_greedy_is_bounded(seed, experts, devices):
    counts, _ = random_counts(np.random.default_rng(seed), layers=3 if experts < 6 else 2, experts=experts)
    best = brute_force(counts, devices)
    p, info = place(counts, devices)
    assert objective(counts, p.device, devices)[0] == pytest.approx(best)
    assert info.gap < 1e-6
    for row in p.device:  # equal counts (5 experts on 2 devices: 3 and 2)
        np.testing.assert_array_equal(np.bincount(row, minlength=devices), capacities(experts, devices))
    g, ginfo = place(counts, devices, max_vars=0)  # too large for the program: the search, gap to a lower bound
    assert ginfo.method == "search" and "skipped" in ginfo.status
    assert ginfo.objective >= best - 1e-9 >= ginfo.bound - 1e-9
    assert ginfo.bound >= lower_bound(counts, devices) - 1e-9
    assert ginfo.gap == pytest.approx((ginfo.objective - ginfo.bound) / ginfo.objective)


@pytest.mark.parametrize(("seed", "experts", "devices", "alpha"),
                         [(0, 6, 2, 1.0), (1, 6, 3, 1.0), (2, 5, 2, 1.0), (3, 5, 2, 0.0), (4, 4, 4, 1.0)])
def test_layer_program_and_search_against_brute_force(seed, experts, devices, alpha):
    # alpha 0 or one expert per device: the load term is fixed and the program is a linear assignment
    counts, _ = random_counts(np.random.default_rng(seed), layers=3, experts=experts)
    cap = capacities(experts, devices)
    layouts = [np.array(p) for p in set(itertools.permutations(np.repeat(np.arange(devices), cap)))]
    start = greedy(counts, devices, alpha)
    for li in range(3):  # one layer re-placed, the others fixed: the program finds the best of every layout
        def value(row, li=li):
            trial = start.copy()
            trial[li] = row
            return objective(counts, trial, devices, alpha)[0]
        row = layer_program(counts, start, li, devices, alpha, 1.0, 10.0)
        np.testing.assert_array_equal(np.bincount(row, minlength=devices), cap)
        assert value(row) == pytest.approx(min(value(r) for r in layouts))
    device, sweeps, converged = improve(counts, start, devices, alpha)
    final = objective(counts, device, devices, alpha)[0]
    assert converged and final <= objective(counts, start, devices, alpha)[0] + 1e-9
    for li in range(3):  # a local optimum: no single-layer change improves it
        for r in layouts:
            trial = device.copy()
            trial[li] = r
            assert objective(counts, trial, devices, alpha)[0] >= final - 1e-9


@pytest.mark.parametrize(("seed", "devices", "alpha"), [(0, 2, 1.0), (1, 3, 1.0), (2, 4, 0.3), (3, 6, 1.0)])
def test_swaps_end_where_no_swap_improves(seed, devices, alpha):
    counts, _ = random_counts(np.random.default_rng(seed), layers=3, experts=12, tokens=200, k=3)
    start = greedy(counts, devices, alpha, passes=0)
    device = start.copy()
    assert swap_layer(counts, device, 1, devices, alpha)
    np.testing.assert_array_equal(np.sort(device[1]), np.sort(start[1]))  # counts per device kept
    final = objective(counts, device, devices, alpha)[0]
    assert final < objective(counts, start, devices, alpha)[0]
    for a, b in itertools.combinations(range(12), 2):
        trial = device.copy()
        trial[1, [a, b]] = trial[1, [b, a]]
        assert objective(counts, trial, devices, alpha)[0] >= final - 1e-9
    # without the exact program (12 x devices binaries > 0): swaps and assignments only, to a swap-local optimum
    searched, _, converged = improve(counts, start, devices, alpha, max_binaries=0)
    value = objective(counts, searched, devices, alpha)[0]
    assert converged and value < objective(counts, start, devices, alpha)[0]
    for li, (a, b) in itertools.product(range(3), itertools.combinations(range(12), 2)):
        trial = searched.copy()
        trial[li, [a, b]] = trial[li, [b, a]]
        assert objective(counts, trial, devices, alpha)[0] >= value - 1e-9


def test_kept_bound_caps_every_placement():
    rng = np.random.default_rng(3)
    for experts, devices in ((6, 2), (6, 3), (5, 2), (4, 2)):
        deps = rng.pareto(1.0, (experts, experts))
        cap = capacities(experts, devices)
        layouts = [np.array(p) for p in set(itertools.permutations(np.repeat(np.arange(devices), cap)))]
        best = max(deps[a[:, None] == b[None, :]].sum() for a in layouts for b in layouts)
        bound = kept_bound(deps, devices)
        assert best - 1e-9 <= bound <= np.sort(deps, axis=1)[:, -cap.max():].sum() + 1e-6
    # a block-diagonal dependency is kept whole, and the bound says so
    assert kept_bound(np.kron(np.eye(2), np.ones((3, 3))), 2) == pytest.approx(18)
    # a 4-cycle (i feeds i and i + 1): the b-matching keeps all 8, any placement at most 6; the spectral bound gives
    # 8 / 2 + 2 * sqrt(2) (the singular values of I + shift are |1 + i^k|)
    cycle = np.eye(4) + np.roll(np.eye(4), 1, axis=1)
    assert kept_bound(cycle, 2) == pytest.approx(4 + 2 * np.sqrt(2))


@pytest.mark.parametrize(("experts", "devices", "replicas"), [(8, 2, 2), (8, 4, 3), (16, 8, 8), (6, 4, 5), (4, 4, 9)])
def test_replicas_never_exceed_memory(experts, devices, replicas):
    rng = np.random.default_rng(experts * devices + replicas)
    load = rng.pareto(1.0, experts) * 100
    primary = contiguous(experts, 1, devices)[0]
    copies, slots = add_replicas(load, primary, devices, replicas)
    per_device = np.bincount([d for c in copies for d in c], minlength=devices)
    assert per_device.max() <= slots == -(-(experts + replicas) // devices)
    assert all(len(set(c)) == len(c) and c[0] == primary[e] for e, c in enumerate(copies))
    assert experts <= sum(len(c) for c in copies) <= experts + replicas
    assert len(copies[int(np.argmax(load))]) > 1  # the hottest expert is copied first


def test_a2a_bytes_hand_computed():
    idx = np.array([[0, 1], [2, 3], [1, 2]])
    home = np.array([0, 1, 1])
    where = np.array([[0, 0], [1, 1], [0, 1]])  # experts 0, 1 on device 0; 2, 3 on device 1
    sent, recv = a2a_bytes(idx, home, where, 2, 10)
    np.testing.assert_array_equal(sent, [0, 10])  # only token 2's expert 1 is remote: device 1 -> device 0
    np.testing.assert_array_equal(recv, [10, 0])
    mask = np.array([[True, True], [True, True], [False, True]])
    assert a2a_bytes(idx, home, where, 2, 10, mask)[0].sum() == 0


def test_simulator_against_contiguous():
    counts, idx = random_counts(np.random.default_rng(7), layers=3, experts=6, tokens=400)
    p, _ = place(counts, 2, replicas=2)
    cost = CostModel(hidden_size=16, intermediate_size=32)
    one = simulate(idx, place(counts, 1)[0], cost, step_tokens=100)
    assert one["bytes_per_step"] == 0  # one device: nothing moves
    sim = simulate(idx, p, cost, step_tokens=100)
    assert sim["steps"] == 4
    for li, layer in enumerate(sim["layers"]):
        assert sum(layer["load"]) == counts.load[li].sum()  # every assignment runs somewhere
    out = compare(idx, counts, p, cost, step_tokens=100)
    assert out["placed"]["cross_tokens"] <= out["contiguous"]["cross_tokens"]
    assert out["cost_model"]["hidden_size"] == 16


def _default_experts() -> int:
    """Routed experts per layer of the default model, read from its config."""
    from moekit.default import default_model_path

    config = json.loads((default_model_path() / "config.json").read_text())
    return config.get("n_routed_experts") or config["num_experts"]


def test_bad_input(tmp_path, capsys):
    with pytest.raises(PlacementError, match="no tokens"):
        counts_from_indices([np.zeros((0, 2), int)], 4)
    counts, _ = random_counts(np.random.default_rng(0))
    with pytest.raises(PlacementError, match="--devices 0"):
        place(counts, 0)
    with pytest.raises(PlacementError, match="more devices than"):
        place(counts, 5)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    experts = _default_experts()
    for args, msg in ((["--devices", "0"], "--devices 0: expected at least 1"),
                      (["--devices", str(experts + 1)], f"more devices than the model's {experts} experts"),
                      (["--devices", "2", "--data", str(empty)], "no text in it"),
                      (["--devices", "2", "--replicas", "-1"], "--replicas -1")):
        assert main(["place", *args, "--out", str(tmp_path / "p.json")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: transformers' loading bar
        assert last.startswith("moekit place: error: ") and msg in last, last


def test_cli_writes_a_placement(tmp_path, capsys):
    out = tmp_path / "placement.json"
    # a checkpoint shaped like moekit-tiny v1 (8 experts per layer), small enough for the exact program in seconds;
    # the v2 default's 64 experts per layer are too many for the whole program: the search places them
    model = str(v1_shaped_checkpoint())
    assert main(["place", model, "--devices", "2", "--replicas", "1", "--max-tokens", "256", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["devices"] == 2 and res["slots"] == 5  # 8 experts: 4 per device plus the one replica slot
    for row in res["device_of_expert"]:
        assert sorted(row) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert res["solver"]["method"] == "milp"
    assert "cross-device tokens" in capsys.readouterr().out
    from moekit.files import umask

    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # the umask's mode, as a plain open() gives (was 0600)
