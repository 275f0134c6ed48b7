"""`moekit bench multitask`: shared bottom, MMoE, PLE, HoME and TaskExpert on the MMoE paper's synthetic tasks at
several task correlations and on scikit-learn's bundled diabetes data split into two tasks; per task test MSE,
parameters, training seconds and HoME's diagnostics (experts with more than 90% zero activations, the tasks' use
of shared experts), per seed and as medians over seeds with the ratio to the shared bottom of the same setting.

Sizes follow the MMoE paper's synthetic experiment: input 100, 8 one-layer experts of 16 ReLU units (MMoE), towers
of 8, a shared bottom of 113 units (about MMoE's parameter count); Adam 1e-3, batch 128.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from moekit.adapt.multitask import MODELS, diagnostics
from moekit.adapt.multitask_tasks import TaskData, diabetes_tasks, evaluate, synthetic_tasks, train
from moekit.bench.drift import machine

COLUMNS = ["data", "correlation", "model", "params", "mse_mean", "mse_task1", "mse_task2", "mse_over_shared_bottom",
           "collapsed_experts", "shared_use", "seconds"]
SIZES = {"shared_bottom": {"hidden": 113}}


def _one(name: str, data: TaskData, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = MODELS[name](data.x_train.shape[1], len(data.names), **SIZES.get(name, {}))
    start = time.perf_counter()
    result = train(model, data, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - start
    evaluate(model, data.x_test, data.ys_test)  # the diagnostics read the test forward
    diag = diagnostics(model)
    return {"model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "mse": result["test_mse"], "train_mse": result["train_mse"], "seconds": seconds,
            "collapsed_experts": sum(v > 0.9 for v in diag["near_zero"].values()),
            "experts": len(diag["near_zero"]), "near_zero": diag["near_zero"],
            "shared_use": diag.get("shared_use"), "shared_share": diag.get("shared_share")}


def bench_multitask(seeds: int = 3, quick: bool = False, correlations: tuple[float, ...] = (1.0, 0.9, 0.5, 0.0),
                    epochs: int = 30, n_train: int = 10_000) -> list[dict]:
    if quick:
        seeds, correlations, epochs, n_train = 1, (1.0, 0.0), 2, 500
    info = machine()
    settings: list[tuple[str, float | None, TaskData, int]] = [
        ("synthetic", p, synthetic_tasks(n_train=n_train, correlation=p, seed=0), epochs) for p in correlations]
    settings.append(("diabetes", None, diabetes_tasks(), 10 if quick else 200))
    records = []
    for data_name, p, data, n_epochs in tqdm(settings, desc="multitask", leave=False):
        runs = [_one(name, data, n_epochs, seed) for seed in range(seeds) for name in MODELS]  # interleaved
        medians = {}
        for name in MODELS:
            mine = [r for r in runs if r["model"] == name]
            per_task = [statistics.median(r["mse"][t] for r in mine) for t in range(len(data.names))]
            medians[name] = statistics.median(sum(r["mse"]) / len(r["mse"]) for r in mine)
            records.append({"data": data_name, "correlation": p, "model": name, "params": mine[0]["params"],
                            "mse_mean": medians[name], "mse_task1": per_task[0], "mse_task2": per_task[1],
                            "collapsed_experts": statistics.median(r["collapsed_experts"] for r in mine),
                            "shared_use": mine[0]["shared_use"],
                            "seconds": statistics.median(r["seconds"] for r in mine),
                            "seeds": seeds, "epochs": n_epochs, "n_train": len(data.x_train), "runs": mine,
                            "tasks": data.names, **info})
        for r in records[-len(MODELS):]:
            r["mse_over_shared_bottom"] = r["mse_mean"] / medians["shared_bottom"]
    return records
