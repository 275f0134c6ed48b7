"""`moekit bench tune [MODEL]`: fill the autotuner's cache (`moekit.core.tune`) for a model's expert shapes and say
what it chose.

For every distinct expert layer shape of the model (its format included: dense, quantized, ...), each dtype and each
token count, one forward of the experts through `run_experts(..., "auto")` on random rows routed top-k at random
makes the tuner time the candidate implementations for that shape class (dispatch's loop / grouped_mm / threads,
and what they run inside: the small-row product, a quantized expert's packed kernel or dequantizing) and cache the
winner. One record per dispatch shape class, with every candidate's median time; then one per inner choice made.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from moekit.bench.timing import environment
from moekit.core import tune
from moekit.core.dispatch import candidate_impls, plan_assignments, run_experts, shape_class
from moekit.errors import ConfigError

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _experts_of(model: nn.Module) -> list[tuple[Any, int]]:
    """(ExpertsLike, k) of each distinct expert shape of the model: its own module where that is moekit's (quantized
    experts), else the view of the family's experts."""
    from moekit.hf.view import view

    seen, out = set(), []
    for block in view(model):
        module = block.experts.module
        experts = module if hasattr(module, "expert") and hasattr(module, "bytes_per_expert") else block.experts
        key = (getattr(experts, "format", "dense"), experts.num_experts, experts.hidden_size,
               experts.intermediate_size, block.k)
        if key not in seen:
            seen.add(key)
            out.append((experts, block.k))
    return out


@torch.no_grad()
def bench_tune(model_path: str | None = None, dtypes: list[str] | None = None,
               tokens: tuple[int, ...] = TOKENS) -> list[dict[str, Any]]:
    """Tune every shape class the model's experts meet at `tokens` tokens per forward, in each of `dtypes`."""
    from moekit.eval import load_model_and_tokenizer

    if not tune.enabled():
        raise ConfigError(f"{tune.ENV}=0: tuning is off; unset it (or set it to 1) to fill the tune cache")
    dtypes = dtypes or list(DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            raise ConfigError(f"--dtype={d!r}: expected one of {', '.join(DTYPES)}")
    path, model, _, _ = load_model_and_tokenizer(model_path)
    tuner = tune.tuner()
    before = set(tuner.table())
    env = environment()
    records: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    work = [(d, t) for d in dtypes for t in tokens]
    for dtype_name, num_tokens in tqdm(work, desc="bench tune", unit="shape"):
        m = model if DTYPES[dtype_name] == torch.float32 else copy.deepcopy(model).to(DTYPES[dtype_name])
        for experts, k in _experts_of(m):
            e = experts.num_experts
            x = torch.randn(num_tokens, experts.hidden_size, generator=g).to(DTYPES[dtype_name])
            indices = torch.rand(num_tokens, e, generator=g).topk(min(k, e), dim=-1).indices
            weights = torch.full(indices.shape, 1.0 / indices.shape[1])
            plan = plan_assignments(indices, weights, e)
            xs = x.index_select(0, plan.token)
            run_experts(xs, plan, experts, "auto")
            active = sum(1 for n in plan.counts if n)
            shape = shape_class(xs, experts, active, candidate_impls(xs, experts))
            record = tuner.table().get(tune.shape_key("dispatch", shape), {})
            records.append({"kind": "dispatch", "model": str(path), "dtype": dtype_name, "tokens": num_tokens,
                            "experts": e, "k": k, "format": shape[0], "hidden": shape[2], "intermediate": shape[3],
                            "rows_per_expert_bucket": shape[4], "active_experts_bucket": shape[5],
                            "chosen": record.get("impl"), "ms": record.get("ms"), **env})
    for key, record in tuner.table().items():
        kind, *shape = key.split("|")
        if kind != "dispatch":
            records.append({"kind": kind, "shape": " ".join(shape), "chosen": record["impl"], "ms": record["ms"],
                            "new": key not in before, **env})
    for r in records:
        r["cache_file"] = str(tuner.path())
    return records


TUNE_COLUMNS = ["kind", "dtype", "tokens", "format", "hidden", "intermediate", "shape", "chosen", "ms"]
