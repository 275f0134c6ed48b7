"""Interleaved timing: every round runs each contender once, in a fresh random order (seeded), so drift in machine
load hits all of them alike and no contender always follows the same one (which would hand it a warm cache); the
result is the median per contender. `environment()` is what every benchmark record carries about the machine."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

from moekit.core.tune import cpu_info


def environment() -> dict:
    """CPU model name, the SIMD/matrix flags present (avx512, avx512_bf16, amx, ...), the ISA level torch runs,
    torch version and the thread count in use."""
    return {**cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                before: Callable[[], object] | None = None, seed: int = 0) -> dict[str, float]:
    """Median wall time in milliseconds of each function over `repeats` interleaved rounds. `before`, if given,
    runs untimed before every timed call (for example to evict the caches, as a decode step finds them)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if before is not None:
                before()
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}
