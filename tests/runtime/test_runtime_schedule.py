import random

import pytest

from moekit.errors import ConfigError
from moekit.runtime.schedule import pick_batch, pick_first_come, simulate


def test_pick_batch_groups_sequences_sharing_experts():
    sets = [{0, 1}, {5, 6}, {0, 1}, {5, 7}, {0, 2}]
    # sequence 0 waited longest: it seeds the batch, then those adding the fewest new experts join
    assert pick_batch(sets, 3, [2, 0, 0, 0, 0], max_wait=10) == [0, 2, 4]
    assert pick_batch(sets, 2, [0, 3, 0, 0, 0], max_wait=10) == [1, 3]


def test_pick_batch_bounded_wait_comes_first():
    sets = [{0}, {0}, {9}, {0}]
    # sequence 2 shares nothing, but reached max_wait: it is chosen, first
    assert pick_batch(sets, 2, [1, 1, 4, 0], max_wait=4)[0] == 2
    # more overdue sequences than slots: the longest-waiting ones
    assert pick_batch([{0}, {1}, {2}], 2, [5, 7, 6], max_wait=3) == [1, 2]


def test_pick_batch_small_and_bad_inputs():
    assert pick_batch([], 4, [], 2) == []
    assert sorted(pick_batch([{1}, {2}], 4, [0, 0], 2)) == [0, 1]
    with pytest.raises(ConfigError, match="waited_steps"):
        pick_batch([{1}], 2, [], 2)
    with pytest.raises(ConfigError, match="max_batch"):
        pick_batch([{1}], 0, [0], 2)


def test_simulate_fewer_experts_than_first_come_and_wait_bounded():
    rng = random.Random(0)
    # two populations of sequences with disjoint expert preferences, interleaved
    routes = [[set(rng.sample(range(8) if s % 2 == 0 else range(8, 16), 2)) for _ in range(6)] for s in range(16)]
    ex = simulate(routes, max_batch=4, max_wait=6, scheduler="expert")
    fc = simulate(routes, max_batch=4, max_wait=6, scheduler="first-come")
    assert ex["tokens"] == fc["tokens"] == 16 * 6
    assert ex["steps"] <= fc["steps"] + 2  # only the tail may run with part-full batches
    assert ex["experts_per_step"] < 0.8 * fc["experts_per_step"]
    assert ex["experts_per_token"] < 0.8 * fc["experts_per_token"]
    assert ex["max_wait_seen"] <= 6
    assert pick_first_come([{0}, {1}, {2}], 2, [0, 2, 1], 9) == [1, 2]
