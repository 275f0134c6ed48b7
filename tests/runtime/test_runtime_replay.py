import pytest
import torch

from moekit.errors import ConfigError
from moekit.runtime.policies import LRU, Belady, count_hits
from moekit.runtime.replay import Routes, capacity_of, compare, gap_closed, oracle_predictions, replay, token_routes


def random_routes(n=60, layers=2, experts=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # skewed: experts 0-2 popular
    probs = torch.tensor([4.0, 3, 2, 1, 1, 1][:experts])
    idx = [torch.stack([torch.multinomial(probs, k, generator=g) for _ in range(n)]) for _ in range(layers)]
    return Routes(idx, torch.arange(n) // 20, [experts] * layers)


def test_replay_equals_direct_policy_and_counts_per_layer():
    routes = Routes([torch.tensor([[0, 1], [0, 2], [1, 2]]), torch.tensor([[3, -1], [3, 4], [3, 4]])],
                    torch.zeros(3, dtype=torch.long), [6, 6])
    keys = routes.keys()
    assert keys == [(0, 0), (0, 1), (1, 3), (0, 0), (0, 2), (1, 3), (1, 4), (0, 1), (0, 2), (1, 3), (1, 4)]
    r = replay(routes, "lru", 3, expert_bytes=10)
    # a step never evicts an expert it is still to use: with 3 slots, token 1's (0,2) evicts (0,1) and (1,4)
    # evicts (0,0); token 2's (0,1) evicts (1,3), not the least recent (0,2) that the step uses next; then (1,3)
    # evicts (0,1): hits (0,0) (0,2) in layer 0, (1,3) (1,4) in layer 1 (plain LRU over the key sequence gets 2)
    assert r["hit_rate_per_layer"] == [pytest.approx(2 / 6), pytest.approx(2 / 5)]
    assert count_hits(LRU(3), keys) == 2
    assert replay(routes, "lru", 4)["hit_rate"] == count_hits(LRU(4), keys) / len(keys)
    assert r["bytes_read"] == r["misses"] * 10
    assert r["bytes_per_token"] == pytest.approx(r["bytes_read"] / 3)
    b = replay(routes, "belady", 3)
    assert b["hit_rate"] == count_hits(Belady(3, keys), keys) / len(keys)


def test_belady_bounds_every_policy_and_gap_closed():
    routes = random_routes()
    rows = compare(routes, ["lru", "lfu", "lfuda", "moe-infinity", "layer-lru", "belady"], [0.25, 0.5])
    for budget in (0.25, 0.5):
        same = [r for r in rows if r["budget"] == budget]
        best = next(r for r in same if r["policy"] == "belady")
        lru = next(r for r in same if r["policy"] == "lru")
        assert all(r["hit_rate"] <= best["hit_rate"] for r in same)
        assert lru["gap_closed"] == 0 and best["gap_closed"] == 1
    assert gap_closed({"hit_rate": 0.6}, {"hit_rate": 0.5}, {"hit_rate": 0.9}) == pytest.approx(0.25)
    assert gap_closed({"hit_rate": 0.6}, {"hit_rate": 0.5}, {"hit_rate": 0.5}) is None


def test_perfect_predictions_make_every_access_a_hit_and_wrong_ones_cost_bytes():
    routes = random_routes()
    r = replay(routes, "lru", 4, predictions=oracle_predictions(routes))
    assert r["hit_rate"] == 1.0 and r["prefetch_precision"] == 1.0
    plain = replay(routes, "lru", 4)
    assert r["bytes_read"] == plain["bytes_read"]  # the same experts read, only earlier
    wrong = [torch.tensor([[e for e in range(6) if e not in row][:2] for row in x.tolist()])
             for x in routes.indices]  # never the real ones
    w = replay(routes, "lru", 4, predictions=wrong)
    assert w["prefetch_precision"] == 0.0
    assert w["bytes_read"] > plain["bytes_read"]


def test_budgets_and_split():
    routes = random_routes()
    assert capacity_of(0.25, routes) == 3 and capacity_of(100, routes) == 12
    with pytest.raises(ConfigError, match="fraction"):
        capacity_of(1.5, routes)
    with pytest.raises(ConfigError, match="at least 1"):
        capacity_of(0, routes)
    train, held = routes.split(0.5)
    assert train.num_tokens + held.num_tokens == routes.num_tokens and held.request.min() > train.request.max()
    paths = token_routes(routes)
    assert paths.shape == (60, 2, 6) and paths.sum() == 60 * 2 * 2


class Words:
    eos_token_id = None

    def encode(self, text, add_special_tokens=False):  # noqa: ARG002 (the transformers signature)
        return [int(w) for w in text.split()]


def test_from_trace_replays_every_routed_expert():
    from hf.tiny import tiny_model
    from moekit.data import TextDoc
    from moekit.inspect import trace

    model = tiny_model("qwen3_moe")
    docs = [TextDoc(" ".join(str(3 + (i * 7 + j) % 90) for j in range(12)), None, f"d{i}") for i in range(3)]
    tr = trace(model, docs, Words(), seq_len=12, progress=False)
    routes = Routes.from_trace(tr)
    assert routes.num_tokens == 36 and routes.num_layers == 2 and routes.request.unique().numel() == 3
    r = replay(routes, "moe-infinity", 1.0)
    assert r["misses"] == 12  # all 2 x 6 experts fit: each is read once
