"""`moekit bench offload --large-gb N [--cgroup-mb M]`: a model larger than the memory it may use, for real.

A random-weight Qwen3-MoE checkpoint whose experts take about N GB (bf16, written layer by layer into a temporary
directory, deleted after) is decoded in a child process placed in a cgroup v1 memory group limited to M MB
(`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where present so swap cannot stand in; page cache
counts against the limit). Contenders, one after another, each with the checkpoint's pages dropped from the page
cache first: moekit's offloaded experts (a budget that fits the cap) and the fully resident model (transformers'
loader), the control that should not fit. llama.cpp (mmap, the anchor) runs only where `llama_cpp` is importable
and a GGUF converter is at hand: not done here, and the record says so. Without a writable cgroup v1 memory
controller (not root, cgroup v2 only), the children run uncapped and the records say that only RSS was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup/memory")


def large_config(gb: float):
    from transformers import AutoConfig

    small = gb < 1
    hidden, width = (256, 128) if small else (1024, 512)
    expert = 3 * hidden * width * 2  # bf16
    layers = max(2, round(gb * 2**30 / (64 * expert)))
    return AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=width,
                                intermediate_size=4 * width, num_experts=64, num_experts_per_tok=8,
                                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=hidden // 8, vocab_size=8192, max_position_embeddings=512,
                                norm_topk_prob=True, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_random_checkpoint(directory: Path, config, seed: int = 0) -> int:
    """Writes config.json and one safetensors shard per layer (plus one for the rest); returns the bytes written."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if ".experts." not in n}
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    rest = {n: (torch.ones(s, dtype=torch.bfloat16) if "norm" in n else rand(s)) for n, s in shapes.items()}
    save_file(rest, directory / "model-rest.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
    total += sum(t.numel() * 2 for t in rest.values())
    hidden, width = config.hidden_size, config.moe_intermediate_size
    for i in tqdm(range(config.num_hidden_layers), desc="random checkpoint", unit="layer"):
        layer = {}
        for j in range(config.num_experts):
            p = f"model.layers.{i}.mlp.experts.{j}"
            layer[f"{p}.gate_proj.weight"] = rand((width, hidden))
            layer[f"{p}.up_proj.weight"] = rand((width, hidden))
            layer[f"{p}.down_proj.weight"] = rand((hidden, width))
        name = f"model-layer{i:03d}.safetensors"
        save_file(layer, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(layer, name))
        total += sum(t.numel() * 2 for t in layer.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return total


def drop_page_cache(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cgroup_available() -> str | None:
    """None when a child memory group can be made here, else why not."""
    if not (CGROUP / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if not os.access(CGROUP, os.W_OK):
        return "cgroup v1 memory controller not writable (not root)"
    return None


def run_capped(cmd: list[str], cap_mb: int | None, timeout: float) -> dict:
    """Run `cmd` in a fresh memory cgroup of `cap_mb` (None or unavailable: uncapped); its exit, peak memory and
    OOM kills."""
    why = None if cap_mb else "no --cgroup-mb"
    why = why or cgroup_available()
    group = None if why else CGROUP / f"moekit-bench-{os.getpid()}-{time.monotonic_ns()}"
    if group is not None:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_mb * 2**20))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap_mb * 2**20))

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    out = {"capped": group is not None, "cap_mb": cap_mb if group is not None else None, "cgroup_note": why}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, preexec_fn=enter, capture_output=True, text=True, timeout=timeout)  # noqa: PLW1509
        out.update(exit_code=proc.returncode, stderr_tail=proc.stderr[-400:])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if lines:
            out.update(json.loads(lines[-1]))
    except subprocess.TimeoutExpired:
        out.update(exit_code=None, timed_out=True)
    out["wall_s"] = time.perf_counter() - t0
    if group is not None:
        out["peak_cgroup_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        out["failcnt"] = int((group / "memory.failcnt").read_text())
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        out["oom_killed"] = int(oom.get("oom_kill", 0)) > 0
        for _ in range(50):  # the child is gone; its page cache charges move to the parent group
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return out


def child(args: argparse.Namespace) -> None:
    """One contender, in the capped process: prints one JSON line."""
    from moekit.runtime.offload import peak_rss_bytes

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (16,), generator=g)
    t0 = time.perf_counter()
    if args.contender == "offload":
        from moekit.runtime.offload import load_offloaded

        off = load_offloaded(args.model, args.budget, "lru", dtype=torch.bfloat16)
        model, store = off.model, off.store
    else:
        import moekit.hf as mh

        model, store = mh.load(args.model, dtype=torch.bfloat16), None
    load_s = time.perf_counter() - t0
    from moekit.bench.offload import greedy

    _, secs, steps = greedy(model, [ids], args.tokens)
    rec = {"contender": args.contender, "load_s": load_s, "decode_tokens_per_s": steps / secs,
           "peak_rss_bytes": peak_rss_bytes()}
    if store is not None:
        rec.update(hit_rate=store.stats.hit_rate, bytes_read=store.stats.bytes_read, budget_bytes=store.budget_bytes)
    print(json.dumps(rec))


def bench_large(gb: float, cap_mb: int | None, tokens: int = 16, timeout: float = 1800) -> list[dict]:
    config = large_config(gb)
    with tempfile.TemporaryDirectory(prefix="moekit-large-") as tmp:
        directory = Path(tmp) / "model"
        total = write_random_checkpoint(directory, config)
        experts = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * \
            config.moe_intermediate_size * 2
        budget = experts // 4 if not cap_mb else min(experts // 4, cap_mb * 2**20 // 4)
        slot = 3 * config.hidden_size * config.moe_intermediate_size * 2
        records = []
        for contender, b in (("offload", budget), ("offload-1-slot", slot), ("resident", budget)):
            drop_page_cache(directory)
            cmd = [sys.executable, "-m", "moekit.bench.offload_large", "--child", str(directory), "--contender",
                   contender.split("-")[0], "--budget", str(b), "--tokens", str(tokens),
                   "--threads", str(torch.get_num_threads())]
            rec = run_capped(cmd, cap_mb, timeout)
            records.append({"kind": "large", "checkpoint_bytes": total, "expert_bytes": experts, "slot_bytes": slot,
                            "layers": config.num_hidden_layers, **rec, "contender": contender})
        full, least = records[0], records[1]
        if full.get("peak_rss_bytes") and least.get("peak_rss_bytes"):
            # what the cache added over a one-expert cache (same process otherwise): the budget, honoured?
            full["rss_over_one_slot_bytes"] = full["peak_rss_bytes"] - least["peak_rss_bytes"]
            full["budget_honoured"] = full["rss_over_one_slot_bytes"] <= budget + 2 * slot + 32 * 2**20
        try:
            import llama_cpp  # noqa: F401

            note = "llama_cpp importable, but GGUF conversion of the checkpoint is not implemented: not run"
        except ImportError:
            note = "llama_cpp not importable: the llama.cpp mmap anchor was not run"
        records.append({"kind": "large", "contender": "llama.cpp", "note": note})
    return records


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", dest="model", required=True)
    p.add_argument("--contender", choices=["offload", "resident"], required=True)
    p.add_argument("--budget", required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    child(p.parse_args())
