"""`moekit bench train`: training-step throughput.

- `tiny-step`: one optimizer step (forward, backward, AdamW) of the `tiny` recipe's model (random weights), its MoE
  blocks through moekit (`moekit.hf.accelerate`) against transformers' own blocks (default experts path), timed
  interleaved in one process.
- `ep`: forward + backward of one MoE layer of the tiny recipe's shape over the same tokens, on 1 process (2 torch
  threads) against expert parallelism on 2 local gloo ranks (1 thread each, half the tokens each), each rank
  timing its own median; tokens/s of the whole batch.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.bench.timing import interleaved

EP_SHAPE = dict(hidden=256, intermediate=384, experts=8, k=2, tokens=4096)


def bench_tiny_step(repeats: int, batch: int = 8, seq_len: int = 256, bf16: bool = False) -> dict:
    """One training step, moekit's blocks against transformers' own; with `bf16` also moekit's blocks under bf16
    autocast (fp32 master weights, as `moekit train --set dtype=bf16` runs), all interleaved."""
    import moekit.hf as mh
    from moekit.train.trainer import RECIPES, _build_model, bf16_native

    recipe = RECIPES["tiny"]
    model = _build_model(recipe, recipe.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, recipe.vocab_size, (batch, seq_len), generator=g)

    def step(accelerated: bool, autocast: bool = False) -> None:
        (mh.accelerate if accelerated else mh.restore)(model)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    fns = {"moekit": lambda: step(True), "transformers": lambda: step(False)}
    if bf16:
        fns["moekit_bf16"] = lambda: step(True, autocast=True)
    ms = interleaved(fns, repeats)
    tokens = batch * seq_len
    rec = {"case": "tiny-step", "tokens": tokens, "repeats": repeats, "moekit_ms": round(ms["moekit"], 2),
           "transformers_ms": round(ms["transformers"], 2),
           "moekit_tokens_per_s": round(tokens / ms["moekit"] * 1e3, 1),
           "transformers_tokens_per_s": round(tokens / ms["transformers"] * 1e3, 1),
           "moekit_over_transformers_tokens_per_s": round(ms["transformers"] / ms["moekit"], 3)}
    if bf16:
        rec.update(moekit_bf16_ms=round(ms["moekit_bf16"], 2), bf16_native=bf16_native(),
                   moekit_bf16_tokens_per_s=round(tokens / ms["moekit_bf16"] * 1e3, 1),
                   bf16_over_fp32_tokens_per_s=round(ms["moekit"] / ms["moekit_bf16"], 3))
    return rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ep_worker(out: str, repeats: int, world: int) -> None:
    """One rank (env:// rendezvous when world > 1): median ms of forward + backward on its share of the tokens."""
    import torch.distributed as dist

    from moekit.core.layer import MoE

    torch.set_num_threads(2 if world == 1 else 1)
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    s = EP_SHAPE
    torch.manual_seed(0)
    moe = MoE(s["hidden"], s["intermediate"], s["experts"], s["k"])
    layer = moe
    if world > 1:
        from moekit.train.expert_parallel import ExpertParallelMoE

        layer = ExpertParallelMoE(moe)
    x = torch.randn(world, s["tokens"] // world, s["hidden"])[rank].requires_grad_()
    grad = torch.randn_like(x)
    times = []
    for i in range(repeats + 1):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        layer(x).hidden.backward(grad)
        if i:  # the first round warms up
            times.append((time.perf_counter() - t0) * 1e3)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"ms": statistics.median(times)}))
    if world > 1:
        from moekit.train.parallel import leave_process_group

        leave_process_group()


def bench_ep(repeats: int) -> dict:
    results = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                   "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "2" if world == 1 else "1"}
            cmd = [sys.executable, "-c", f"from moekit.bench.train import ep_worker; ep_worker({tmp!r}, {repeats}, "
                   f"{world})"]
            procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in range(world)]
            if any(p.wait(timeout=600) for p in procs):
                raise RuntimeError(f"bench ep: a rank of the {world}-process run failed")
            results[world] = max(json.loads(Path(tmp, f"rank{r}.json").read_text())["ms"] for r in range(world))
    tokens = EP_SHAPE["tokens"]
    return {"case": "ep", **EP_SHAPE, "repeats": repeats, "one_rank_ms": round(results[1], 2),
            "two_ranks_ms": round(results[2], 2), "one_rank_tokens_per_s": round(tokens / results[1] * 1e3, 1),
            "two_ranks_tokens_per_s": round(tokens / results[2] * 1e3, 1),
            "two_ranks_over_one_rank_tokens_per_s": round(results[1] / results[2], 3)}


def bench_train(repeats: int = 5, quick: bool = False, dtype: str = "fp32") -> list[dict]:
    """dtype "bf16" adds a bf16-autocast contender to the training step (against fp32 in the same run)."""
    bf16 = dtype == "bf16"
    if quick:
        return [bench_tiny_step(1, batch=1, seq_len=32, bf16=bf16), bench_ep(1)]
    return [bench_tiny_step(repeats, bf16=bf16), bench_ep(repeats)]
