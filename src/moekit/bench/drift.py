"""`moekit bench drift`: DriftMoE (both variants) against river's Hoeffding tree, ARF (10 trees), SRP (10) and
leveraging bagging (10) on the DriftMoE paper's synthetic streams, generated offline, and river's bundled real data.

Test-then-train over one pass; the contenders are interleaved per instance (each instance goes to every contender
in a fresh random order), so machine load hits all alike. Per stream and contender: accuracy, kappa, kappa-m,
kappa-t, mean and median microseconds per instance (predict + learn), and accuracy minus the Hoeffding tree's and
ARF's, time over ARF's, all from the same run.

Synthetic streams, `length` instances each, drifts at 1/4, 1/2 and 3/4 of it (the paper's MOA setup, scaled):
LED_a / LED_g (LED with 1, 3, 5, 7 drifting attributes, 10% noise, 17 irrelevant attributes), SEA_a / SEA_g
(SEA functions 0 -> 1 -> 2 -> 3, 10% label noise), abrupt: width 1, gradual: width length / 20; RBF_m / RBF_f
(random RBF, 5 classes, 10 features, 50 centroids all drifting at speed 1e-4 / 1e-3).
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from itertools import islice

import torch
from river import datasets, ensemble, forest, tree
from river.datasets import synth
from tqdm import tqdm

from moekit.adapt import DriftMoE
from moekit.adapt.streams import Prequential, switch
from moekit.errors import UnknownNameError

COLUMNS = ["stream", "model", "n", "accuracy", "kappa", "kappa_m", "kappa_t", "us_per_instance",
           "acc_minus_ht", "acc_minus_arf", "time_over_arf"]


def machine() -> dict:
    """What every record carries: CPU model and flags that matter, torch and river versions, threads."""
    import river

    name, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        name = info.get("model name", name)
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {"cpu": name, "cpu_flags": [f for f in wanted if f in flags], "torch": torch.__version__,
            "river": river.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def synthetic_streams(length: int, seed: int = 0) -> dict[str, Callable[[], Iterable]]:
    quarter = [length // 4, length // 2, 3 * length // 4]
    gradual = max(length // 20, 2)

    def led(width: int) -> Iterable:
        concepts = [synth.LEDDrift(seed=seed + i, noise_percentage=0.1, irrelevant_features=True,
                                   n_drift_features=d) for i, d in enumerate((1, 3, 5, 7))]
        return switch(concepts, quarter, width, seed=seed)

    def sea(width: int) -> Iterable:
        return switch([synth.SEA(variant=v, noise=0.1, seed=seed + v) for v in range(4)], quarter, width, seed=seed)

    def rbf(speed: float) -> Iterable:
        return synth.RandomRBFDrift(seed_model=seed, seed_sample=seed + 1, n_classes=5, n_features=10,
                                    n_centroids=50, change_speed=speed, n_drift_centroids=50)

    return {"LED_a": lambda: led(1), "LED_g": lambda: led(gradual), "SEA_a": lambda: sea(1),
            "SEA_g": lambda: sea(gradual), "RBF_m": lambda: rbf(1e-4), "RBF_f": lambda: rbf(1e-3)}


def real_streams() -> dict[str, Callable[[], Iterable]]:
    """river's bundled files (no download): Phishing, Bananas, ImageSegments, Shuttle."""
    return {"Phishing": datasets.Phishing, "Bananas": datasets.Bananas, "ImageSegments": datasets.ImageSegments,
            "Shuttle": datasets.Shuttle}


def contenders(seed: int = 0) -> dict[str, Callable[[], object]]:
    return {
        "HoeffdingTree": lambda: tree.HoeffdingTreeClassifier(grace_period=50, delta=1e-7),
        "ARF10": lambda: forest.ARFClassifier(n_models=10, seed=seed),
        "SRP10": lambda: ensemble.SRPClassifier(model=tree.HoeffdingTreeClassifier(grace_period=50, delta=0.01),
                                                n_models=10, seed=seed),
        "LevBag10": lambda: ensemble.LeveragingBaggingClassifier(tree.HoeffdingTreeClassifier(grace_period=50),
                                                                 n_models=10, seed=seed),
        "DriftMoE_data": lambda: DriftMoE(n_experts=12, top_k=3, mode="data", seed=seed),
        "DriftMoE_task": lambda: DriftMoE(mode="task", seed=seed),
    }


def run_stream(name: str, stream: Iterable, models: dict[str, object], limit: int, seed: int = 0) -> list[dict]:
    scores = {m: Prequential() for m in models}
    times: dict[str, list[float]] = {m: [] for m in models}
    order = list(models)
    rng = random.Random(seed)
    for x, y in tqdm(islice(stream, limit), total=limit, desc=name, leave=False, mininterval=2):
        rng.shuffle(order)
        for m in order:
            start = time.perf_counter()
            y_pred = models[m].predict_one(x)
            models[m].learn_one(x, y)
            times[m].append(time.perf_counter() - start)
            scores[m].update(y, y_pred)
    records = [{"stream": name, "model": m, "n": scores[m].n, **scores[m].scores(),
                "us_per_instance": 1e6 * sum(times[m]) / max(len(times[m]), 1),
                "us_median": 1e6 * statistics.median(times[m]) if times[m] else None} for m in models]
    by = {r["model"]: r for r in records}
    for r in records:
        for ref, key in (("HoeffdingTree", "acc_minus_ht"), ("ARF10", "acc_minus_arf")):
            r[key] = None if ref not in by or r["accuracy"] is None else r["accuracy"] - by[ref]["accuracy"]
        r["time_over_arf"] = (r["us_per_instance"] / by["ARF10"]["us_per_instance"]
                              if "ARF10" in by and by["ARF10"]["us_per_instance"] else None)
    return records


def bench_drift(length: int = 6_000, real_limit: int = 3_000, seed: int = 0, quick: bool = False,
                models: list[str] | None = None, streams: list[str] | None = None) -> list[dict]:
    if quick:
        length, real_limit = 200, 150
    info = machine()
    makers = contenders(seed)
    chosen_models = models or list(makers)
    all_streams = {**synthetic_streams(length, seed), **real_streams()}
    for kind, asked, known in (("--model", chosen_models, makers), ("--stream", streams or [], all_streams)):
        for a in asked:
            if a not in known:
                raise UnknownNameError(f"{kind} {a!r}: expected one of {', '.join(known)}")
    records = []
    for name in streams or list(all_streams):
        limit = length if name in synthetic_streams(length) else real_limit
        instances = {m: makers[m]() for m in chosen_models}
        for r in run_stream(name, all_streams[name](), instances, limit, seed):
            records.append({**r, "length": length, "seed": seed, "quick": quick, **info})
    return records
