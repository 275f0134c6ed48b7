import itertools
import random

import pytest

from moekit.errors import ConfigError, UnknownNameError
from moekit.runtime.policies import LFU, LFUDA, LRU, ActivationAware, Belady, PerLayer, count_hits, make_policy


def best_hits(keys, capacity):
    """Brute force: the most hits any eviction choice achieves (demand fetching, every miss is inserted)."""
    states = {frozenset(): 0}
    for key in keys:
        nxt = {}
        for res, hits in states.items():
            if key in res:
                options = [(res, hits + 1)]
            elif len(res) < capacity:
                options = [(res | {key}, hits)]
            else:
                options = [((res - {v}) | {key}, hits) for v in res]
            for r, h in options:
                nxt[r] = max(nxt.get(r, -1), h)
        states = nxt
    return max(states.values())


SEQ = list("ABACBA")


def test_lru_lfu_belady_known_hits():
    assert count_hits(LRU(2), SEQ) == 1   # A B A(hit) C(-B) B(-A) A(-C)
    assert count_hits(LFU(2), SEQ) == 2   # C evicts B (1 use), B evicts C, A hits
    assert count_hits(Belady(2, SEQ), SEQ) == 2  # C evicts A (next use 5, B's is 4), B hits
    assert count_hits(LRU(3), SEQ) == 3


def test_lfuda_ages_out_a_stale_favourite():
    seq = list("A" * 8) + list("BC") * 6
    assert count_hits(LFU(2), seq) == 7  # A, used 8 times early, stays forever; B and C thrash
    lfuda = LFUDA(2)
    assert count_hits(lfuda, seq) > 7
    assert lfuda.resident == {"B", "C"}


@pytest.mark.parametrize("seed", range(30))
def test_belady_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    keys = [rng.choice("ABCDE") for _ in range(rng.randint(4, 12))]
    cap = rng.randint(1, 3)
    best = best_hits(keys, cap)
    assert count_hits(Belady(cap, keys), keys) == best
    for policy in (LRU(cap), LFU(cap), LFUDA(cap)):
        assert count_hits(policy, keys) <= best


def test_belady_refuses_a_different_future():
    b = Belady(2, list("AB"))
    b.access("A")
    with pytest.raises(ConfigError, match="future"):
        b.access("C")


def test_demoted_keys_go_first_and_insert_returns_evicted():
    p = LRU(2)
    count_hits(p, ["A", "B"])
    p.insert("X")  # prefetch: resident without a use
    assert p.resident == {"B", "X"}
    p.access("B")
    p.demote("X")  # it was mispredicted: evicted before the least recently used key
    assert p.victim() == "X"
    assert p.insert("C") == ["X"]
    assert len(p) == 2 and "C" in p


def test_per_layer_quotas():
    p = PerLayer(4, 2, LRU)
    keys = [(0, 0), (0, 1), (0, 2), (1, 0), (0, 0), (1, 0)]
    # layer 0 has 2 slots: (0, 2) evicts (0, 0), so (0, 0) misses again; layer 1 keeps (1, 0)
    assert count_hits(p, keys) == 1
    assert len(p) == 3 and p.victim(layer=1) == (1, 0)
    assert count_hits(LRU(4), keys) == 2  # the global cache lends layer 0 layer 1's slots
    with pytest.raises(ConfigError, match="per layer"):
        PerLayer(1, 2, LRU)


def test_activation_aware_keeps_what_a_similar_past_request_used():
    p = ActivationAware(2, num_layers=1, num_experts=4)
    for e in (0, 1, 0, 1):  # request 1 uses experts 0 and 1
        if not p.access((0, e)):
            p.insert((0, e))
    p.begin_request()
    for e in (0, 2):  # request 2 starts like request 1
        if not p.access((0, e)):
            p.insert((0, e))
    # resident {0, 2}: the matched request used 0 (and 1), never 2 -> 2 goes
    assert p.resident == {(0, 0), (0, 2)}
    assert p.victim() == (0, 2)


def test_make_policy_names():
    assert isinstance(make_policy("layer-lfuda", 4, 2, 4), PerLayer)
    with pytest.raises(UnknownNameError, match="unknown cache policy 'mru'"):
        make_policy("mru", 4, 2, 4)
    with pytest.raises(ConfigError, match="trace replay"):
        make_policy("belady", 4, 2, 4)
    with pytest.raises(ConfigError, match="at least 1"):
        LRU(0)
    for name, cap in itertools.product(("lru", "lfu", "lfuda", "moe-infinity"), (1, 3)):
        p = make_policy(name, cap, 2, 3)
        keys = [(i % 2, (i * 7) % 3) for i in range(20)]
        count_hits(p, keys)
        assert len(p) <= cap


def test_protected_keys_are_never_evicted():
    from moekit.runtime.policies import CacheFull

    p = LFU(2)
    count_hits(p, ["A", "A", "B"])
    assert p.victim() == "B" and p.victim(protect={"B"}) == "A"
    assert p.insert("C", protect={"B"}) == ["A"]
    with pytest.raises(CacheFull):
        p.insert("D", protect={"B", "C"})
