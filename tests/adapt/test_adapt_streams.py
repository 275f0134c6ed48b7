from __future__ import annotations

import itertools
import math

import pytest

from moekit.adapt.streams import Prequential, drift_probability, switch
from moekit.errors import ConfigError


def concept(label: int):
    return itertools.repeat(({"v": 0.0}, label))


def test_abrupt_drifts_switch_exactly_at_their_positions():
    labels = [y for _, y in itertools.islice(switch([concept(0), concept(1), concept(2)], [5, 12], 1), 20)]
    assert labels == [0] * 5 + [1] * 7 + [2] * 8


def test_gradual_drift_follows_the_sigmoid_centred_on_its_position():
    labels = [y for _, y in itertools.islice(switch([concept(0), concept(1)], [2000], 400, seed=1), 4000)]
    assert sum(labels[:1400]) <= 5  # sigmoid(-6) = 0.25%: ~3 expected
    middle = labels[1900:2100]
    expected = sum(drift_probability(t, 2000, 400) for t in range(1900, 2100)) / 200
    assert abs(sum(middle) / 200 - expected) < 0.1 and abs(expected - 0.5) < 0.01
    assert sum(labels[2600:]) >= 1395  # 1 - sigmoid(6) per instance


def test_narrow_width_at_a_large_position_does_not_overflow():
    # river's ConceptDriftStream raises OverflowError here (4 * 1e6 / 3 > 709 inside exp)
    labels = [y for _, y in itertools.islice(switch([concept(0), concept(1)], [1_000_000], 3), 1000)]
    assert labels == [0] * 1000
    assert drift_probability(0, 10**9, 3) == 0.0 and drift_probability(2 * 10**9, 10**9, 3) == 1.0
    assert drift_probability(10**9, 10**9, 3) == 0.5
    assert math.isclose(drift_probability(10**9 + 3, 10**9, 12), 1 / (1 + math.exp(-1)))


def test_a_concept_only_advances_when_it_supplies():
    first = iter([({"i": i}, 0) for i in range(3)])
    second = iter([({"i": i}, 1) for i in range(3)])
    out = list(switch([first, second], [2], 1))
    assert out == [({"i": 0}, 0), ({"i": 1}, 0), ({"i": 0}, 1), ({"i": 1}, 1), ({"i": 2}, 1)]


def test_bad_drift_arguments():
    with pytest.raises(ConfigError, match="positions"):  # refused at the call, before any instance is drawn
        switch([concept(0), concept(1)], [5, 9], 1)
    with pytest.raises(ConfigError, match="positions"):
        switch([concept(0), concept(1), concept(2)], [9, 5], 1)
    with pytest.raises(ConfigError, match="widths"):
        switch([concept(0), concept(1)], [5], 0)


def test_prequential_kappas_by_hand():
    m = Prequential()
    # labels a a b b, predictions a b b a: 2/4 right; majority (seen so far) right on #2 only (a after a; b vs a
    # a still leads on #3 and #4): 1/4; no-change right on #2 and #4: 2/4
    for y, p in zip("aabb", "abba", strict=True):
        m.update(y, p)
    s = m.scores()
    assert s["accuracy"] == 0.5
    assert math.isclose(s["kappa_m"], (0.5 - 0.25) / 0.75)
    assert s["kappa_t"] == 0.0
    assert s["kappa"] == 0.0  # chance agreement 0.5
