"""`moekit bench domain`: the global/local expert with a gate and Meta-DMoE on shifted digits.

Global/local: GE (an MLP) trained on the digits; a user whose digits are shifted 2 right, 1 down at contrast 0.7
gives `user_samples` labelled samples; LE and GN train on them (GN against as many generic samples). Accuracy on
the user's and on the generic test split for GE, LE and GE + LE + GN, and LE + GN's parameters over GE's (the
paper: accuracy up on the user's data, almost no loss on generic data, ~2.5% overhead).

Meta-DMoE: source domains shifted one pixel left, right, up, down; target shifted 1 right and 1 down at contrast
0.8. Accuracy on the target test split of the student before and after distilling on `target_samples` unlabeled
target samples, of the aggregated teachers, and of the teachers' mean logits (the paper: adaptation raises the
student's accuracy on the unseen domain).
"""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from moekit.adapt.continual import mlp
from moekit.adapt.domain import GlobalLocal, accuracy, fit, shifted_digits, train_meta_dmoe
from moekit.bench.drift import machine

COLUMNS = ["experiment", "metric", "median", "values"]


def _global_local(seed: int, user_samples: int, epochs: int) -> dict:
    xg, yg, xg_test, yg_test = shifted_digits(seed=seed)
    xu, yu, xu_test, yu_test = shifted_digits(2, 1, 0.7, seed=seed)
    torch.manual_seed(seed)
    ge = fit(mlp(64, 64, 10), xg, yg, epochs, seed=seed)
    gl = GlobalLocal(ge)
    gl.fit_local(xu[:user_samples], yu[:user_samples], xg[:user_samples], epochs=epochs * 5, seed=seed)
    predict_ge = lambda x: ge(x).argmax(-1)
    predict_le = lambda x: gl.le(x).argmax(-1)
    return {"ge_user": accuracy(predict_ge, xu_test, yu_test), "le_user": accuracy(predict_le, xu_test, yu_test),
            "moe_user": accuracy(gl.predict, xu_test, yu_test), "ge_generic": accuracy(predict_ge, xg_test, yg_test),
            "moe_generic": accuracy(gl.predict, xg_test, yg_test), "overhead": gl.overhead()}


def _meta_dmoe(seed: int, target_samples: int, epochs: int) -> dict:
    sources = [shifted_digits(dx, dy, seed=seed)[:2] for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    xt, _, xt_test, yt_test = shifted_digits(1, 1, 0.8, seed=seed)
    model = train_meta_dmoe(sources, epochs=epochs, agg_epochs=max(1, epochs // 2), seed=seed)
    adapted = model.adapt(xt[:target_samples])
    with torch.no_grad():
        logits = model.teacher_logits(xt_test)
        return {"student_before": accuracy(lambda x: model.student(x).argmax(-1), xt_test, yt_test),
                "student_after": accuracy(lambda x: adapted(x).argmax(-1), xt_test, yt_test),
                "aggregator": float((model.aggregator(logits).argmax(-1) == yt_test).float().mean()),
                "teachers_mean": float((logits.mean(1).argmax(-1) == yt_test).float().mean())}


def bench_domain(seeds: int = 3, quick: bool = False, user_samples: int = 150, target_samples: int = 32,
                 epochs: int = 30) -> list[dict]:
    if quick:
        seeds, epochs = 1, 3
    info = machine()
    runs = {"global_local": [], "meta_dmoe": []}
    for seed in tqdm(range(seeds), desc="domain", leave=False):
        runs["global_local"].append(_global_local(seed, user_samples, epochs))
        runs["meta_dmoe"].append(_meta_dmoe(seed, target_samples, epochs))
    records = []
    for experiment, rs in runs.items():
        for metric in rs[0]:
            values = [r[metric] for r in rs]
            records.append({"experiment": experiment, "metric": metric, "median": statistics.median(values),
                            "values": values, "seeds": seeds, "epochs": epochs, "user_samples": user_samples,
                            "target_samples": target_samples, **info})
    return records
