import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.errors import ConfigError, UnknownNameError
from moekit.runtime.offload import load_offloaded
from moekit.runtime.prefetch import PathPredictor, Prefetcher, predicted_routes, train_predictor
from moekit.runtime.replay import Routes, replay

IDS = torch.tensor([[5, 7, 9, 11, 13, 17]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m"
    mh.save(tiny_model("olmoe"), path)
    ref = mh.load(path)
    mh.accelerate(ref, "loop")
    with torch.no_grad():
        tokens = ref.generate(IDS, max_new_tokens=8, do_sample=False)
    return path, tokens


def generate(off):
    with torch.no_grad():
        out = off.model.generate(IDS, max_new_tokens=8, do_sample=False)
    off.store.drain()
    return out


def test_next_layer_speculation_is_lossless_and_reads_ahead(checkpoint):
    path, tokens = checkpoint
    off = load_offloaded(path, "34%")
    pf = Prefetcher(off, "next-layer")
    assert torch.equal(generate(off), tokens)
    s = off.store.stats
    assert s.prefetched > 0 and s.prefetch_used > 0
    assert s.peak_cached_bytes <= off.store.budget_bytes
    pf.remove()
    off.close()


def test_mispredicted_prefetches_are_evicted_first(checkpoint):
    path, tokens = checkpoint
    off = load_offloaded(path, "50%", workers=0)
    store = off.store
    store.get(0, 0)
    store.get(0, 1)
    store.prefetch([(1, 4), (1, 5)])
    store.begin_layer(1, [4])  # the real gate chose 4, not 5
    assert store.policy.victim() == (1, 5)
    off.close()


def test_pregate_lookahead_hook(checkpoint):
    path, tokens = checkpoint
    off = load_offloaded(path, "34%")
    with pytest.raises(ConfigError, match="no pre-gating router"):
        Prefetcher(off, "pregate")
    calls = []

    def pregate(ids):  # a stand-in pre-gating router: expert (id mod 6) and the next one, in every layer
        calls.append(ids.shape)
        first = ids.reshape(-1) % 6
        return [torch.stack([first, (first + 1) % 6], -1) for _ in range(2)]

    pf = Prefetcher(off, "pregate", pregate=pregate)
    assert torch.equal(generate(off), tokens)  # lossless whatever the guesses
    assert calls and all(s[-1] == 1 for s in calls[1:])  # consulted at each decode step
    assert off.store.stats.prefetched > 0
    pf.remove()
    off.close()


def test_bad_modes(checkpoint):
    path, _ = checkpoint
    off = load_offloaded(path, "34%")
    with pytest.raises(UnknownNameError, match="unknown prefetch mode 'psychic'"):
        Prefetcher(off, "psychic")
    with pytest.raises(ConfigError, match="path predictor"):
        Prefetcher(off, "predictor")
    off.close()


def synthetic(n=600, layers=2, experts=8, vocab=20, seed=0):
    """Routes decided by the token id (plus noise): a predictor can learn them, LRU cannot anticipate them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    idx = [torch.stack([(ids * (3 + i)) % experts, (ids * (5 + i) + 1) % experts], -1) for i in range(layers)]
    for x in idx:
        same = x[:, 0] == x[:, 1]
        x[same, 1] = (x[same, 1] + 1) % experts
    return Routes(idx, torch.arange(n) // 50, [experts] * layers), ids


def test_path_predictor_learns_routes_and_closes_the_gap(tmp_path):
    train_routes, train_ids = synthetic(seed=0)
    held, held_ids = synthetic(seed=1)
    model = train_predictor(train_routes, train_ids, vocab=20, epochs=30)
    pred = predicted_routes(model, held, held_ids, 2)
    exact = sum(int((torch.sort(p, -1).values == torch.sort(x, -1).values).all(-1).sum())
                for p, x in zip(pred, held.indices, strict=True))
    assert exact > 0.95 * held.num_tokens * 2
    lru = replay(held, "lru", 6)
    with_pred = replay(held, "lru", 6, predictions=pred)
    best = replay(held, "belady", 6)
    assert with_pred["hit_rate"] >= lru["hit_rate"] + 0.10
    assert (with_pred["hit_rate"] - lru["hit_rate"]) / (best["hit_rate"] - lru["hit_rate"]) >= 0.25
    model.save(tmp_path / "p")
    again = PathPredictor.load(tmp_path / "p")
    paths = torch.zeros(3, 2, 8)
    assert torch.equal(again(held_ids[:3], paths), model(held_ids[:3], paths))
    with pytest.raises(ConfigError, match="not a path predictor"):
        PathPredictor.load(tmp_path)


def test_predictor_prefetch_live_is_lossless(checkpoint):
    path, tokens = checkpoint
    off = load_offloaded(path, "34%")
    model = PathPredictor(97, 2, 6)
    pf = Prefetcher(off, "predictor", predictor=model, width=2)
    assert torch.equal(generate(off), tokens)
    assert off.store.stats.prefetched > 0
    pf.remove()
    with pytest.raises(ConfigError, match="trained for 3 MoE layers"):
        Prefetcher(off, "predictor", predictor=PathPredictor(97, 3, 6))
    off.close()
