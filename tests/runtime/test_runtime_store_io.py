"""The store's I/O under a slow disk: prefetch reads overlap the caller's work, buffers come from the caller's
thread, and a prefetch evicted before it started is never read."""

import threading
import time

import pytest
import torch

import moekit.hf as mh
from hf.tiny import tiny_model
from moekit.runtime.offload import load_offloaded
from moekit.runtime.prefetch import Prefetcher
from moekit.runtime.store import ExpertStore, PreadReader

IDS = torch.tensor([[5, 7, 9, 11, 13, 17]])


class SlowReader(PreadReader):
    """Every range takes `delay` seconds (a disk; sleeping releases the GIL as a blocking read does); records which
    thread read and the most reads in flight at once. `gate`, when set, holds reads off the main thread."""

    def __init__(self, delay=0.0, gate=None):
        super().__init__()
        self.delay, self.gate = delay, gate
        self.by_thread, self.in_flight, self.most_in_flight, self.ranges = {}, 0, 0, []
        self._count = threading.Lock()

    def read(self, path, offset, length, out=None):
        main = threading.current_thread() is threading.main_thread()
        if self.gate is not None and not main:
            self.gate.wait()
        with self._count:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.by_thread["main" if main else "worker"] = self.by_thread.get("main" if main else "worker", 0) + 1
            self.ranges.append(offset)
        time.sleep(self.delay)
        with self._count:
            self.in_flight -= 1
        return super().read(path, offset, length, out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m"
    mh.save(tiny_model("olmoe"), path)
    return path


def run(path, mode, pregate=None):
    """Greedy tokens through a slow reader; the layers' chosen experts per forward."""
    reader = SlowReader(delay=0.002)
    off = load_offloaded(path, "34%", reader=reader)
    reader.by_thread.clear()  # count the experts' reads only, not the resident weights'
    chosen = []
    begin = off.store.begin_layer
    off.store.begin_layer = lambda layer, experts: (chosen.append(sorted(experts)), begin(layer, experts))
    if mode != "none":
        Prefetcher(off, mode, pregate=pregate)
    with torch.no_grad():
        out = off.model.generate(IDS, max_new_tokens=8, do_sample=False)
    off.store.drain()
    off.close()
    return out, reader, chosen


def test_right_guesses_are_read_by_the_prefetch_threads_while_the_caller_works(checkpoint):
    tokens, plain, chosen = run(checkpoint, "none")
    steps = [chosen[i:i + 2] for i in range(2, len(chosen), 2)]  # 2 MoE layers; the prefill's forward skipped

    def oracle(_ids):  # a pre-gate that knows each decode step's experts (Read-ME's lookahead, perfect)
        return [torch.tensor(e).view(1, -1) for e in steps.pop(0)]

    same, ahead, _ = run(checkpoint, "pregate", oracle)
    assert torch.equal(tokens, same) and not steps
    assert "worker" not in plain.by_thread and plain.most_in_flight == 1
    assert ahead.most_in_flight >= 2  # a prefetch read in flight beside the caller's own read
    assert ahead.by_thread["worker"] > 0
    assert ahead.by_thread["main"] < plain.by_thread["main"] / 2  # the decode steps' misses were read ahead


def test_prefetch_buffers_come_from_the_callers_thread(checkpoint, monkeypatch):
    threads = []
    alloc = ExpertStore._alloc

    def spy(self, key):
        threads.append(threading.current_thread() is threading.main_thread())
        return alloc(self, key)

    monkeypatch.setattr(ExpertStore, "_alloc", spy)
    _, reader, _ = run(checkpoint, "next-layer")
    assert reader.by_thread["worker"] > 0 and threads and all(threads)


def test_a_prefetch_evicted_before_it_starts_is_not_read(checkpoint):
    gate = threading.Event()
    reader = SlowReader(gate=gate)
    off = load_offloaded(checkpoint, "17%", reader=reader, workers=1)  # 2 of 12 experts
    store = off.store
    assert store.policy.capacity == 2
    ranges = {k: [r[1] for p in store.experts[k].values() for r in p.ranges] for k in [(1, 0), (1, 1)]}
    reader.ranges.clear()
    try:
        store.prefetch([(1, 0), (1, 1)])  # one worker: (1, 0) waits at the gate, (1, 1) is queued behind it
        store.begin_layer(1, [4, 5])  # the gate chose neither: both demoted
        store.get(1, 4)
        store.get(1, 5)  # the two misses evict both guesses
    finally:
        gate.set()
    store.drain()
    assert not set(ranges[(1, 1)]) & set(reader.ranges)
    assert (1, 0) not in store.cache and (1, 1) not in store.cache
    off.close()


def test_mmap_threshold_is_fixed_at_the_expert_part_size():
    """On glibc the store fixes the mmap threshold (clamped to glibc's range), so evicted experts go back to the
    system instead of staying in the heap; elsewhere it does nothing."""
    import ctypes.util

    from moekit.runtime.store import MMAP_THRESHOLD_RANGE, fixed_mmap_threshold

    if ctypes.util.find_library("c") is None:
        pytest.skip("no C library to call mallopt on")
    assert fixed_mmap_threshold(3 << 20) == 3 << 20
    assert fixed_mmap_threshold(10) == MMAP_THRESHOLD_RANGE[0]
    assert fixed_mmap_threshold(1 << 30) == MMAP_THRESHOLD_RANGE[1]
    assert fixed_mmap_threshold(0) is None
