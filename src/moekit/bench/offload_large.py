"""`moekit bench offload --large-gb N --cgroup-mb M`: a model larger than the memory it may use, for real.

A random-weight Qwen3-MoE checkpoint whose experts take about N GB (bf16, one safetensors shard per layer, with
moekit-tiny's tokenizer so that llama.cpp's converter takes it) is written into a temporary directory (deleted
after). Each contender then runs in a child process of its own cgroup v1 memory group limited to M MiB, page cache
counted (`moekit.bench.offload_cgroup`), with the checkpoint's pages dropped from the page cache first, on the same
16 prompt token ids, greedy:

- `offload-1-slot`: moekit with a one-expert cache; its peak memory sizes the others' budget:
  budget = M - its peak RSS - headroom (max(M / 8, 128 MiB), for page cache in flight and allocator slack).
- `offload-<mode>` for each prefetch mode asked (none, next-layer): moekit's offloaded experts at that budget.
- `llama.cpp`: the same weights converted to GGUF (bf16) by llama.cpp's converter, run through `llama_cpp.Llama`
  with mmap (the page cache decides): the anchor.
- `resident`: the model loaded whole by transformers, the control that should not fit.

The physical bound of each moekit row uses the disk bandwidth and read latency measured in the same run, on the
checkpoint's filesystem: tok/s <= 1 / ((1 - m) B / BW_ram + m B / BW_disk + m n t_read).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.bench.offload_cgroup import drop_page_cache, process_io, run_capped
from moekit.errors import ConfigError

PROMPT = 16
MiB = 2**20


def large_config(gb: float):
    """Qwen3-MoE, 64 experts, top-8, with as many layers as make the experts about `gb` GB (bf16)."""
    from transformers import AutoConfig

    hidden, width = (256, 128) if gb < 1 else (1024, 512)
    expert = 3 * hidden * width * 2
    layers = max(2, round(gb * 2**30 / (64 * expert)))
    return AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=width,
                                intermediate_size=4 * width, num_experts=64, num_experts_per_tok=8,
                                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=hidden // 8, vocab_size=4096, max_position_embeddings=512,
                                norm_topk_prob=True, tie_word_embeddings=False, torch_dtype="bfloat16",
                                bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                architectures=["Qwen3MoeForCausalLM"])


def write_random_checkpoint(directory: Path, config, seed: int = 0) -> int:
    """Writes config.json, moekit-tiny's tokenizer and one safetensors shard per layer (plus one for the rest);
    returns the bytes of tensors written."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from moekit.default import default_model_path

    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, directory / name)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if ".experts." not in n}
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    # norms 1; embeddings N(0, 1), so that the residual stream stays each token's own (with N(0, 0.02) embeddings a
    # deep random model's states converge across tokens and every token takes the same few experts); the rest
    # N(0, 0.02)
    rest = {n: torch.ones(s, dtype=torch.bfloat16) if "norm" in n else
            (rand(s) * 50).to(torch.bfloat16) if "embed_tokens" in n else rand(s) for n, s in shapes.items()}
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


def token_stream(tokens: int) -> list[int]:
    """The ids every contender reads: PROMPT of prefill, then `tokens` decode steps, each fed the next id of the
    stream (not its own argmax: a random model's greedy output repeats one token, whose experts then always hit)."""
    return torch.randint(3, 4000, (PROMPT + tokens,), generator=torch.Generator().manual_seed(0)).tolist()


def _child_moekit(args: argparse.Namespace) -> dict:
    from moekit.runtime.decode import Decoder
    from moekit.runtime.offload import load_offloaded

    t0 = time.perf_counter()
    if args.contender == "resident":
        import moekit.hf as mh

        model, store = mh.load(args.model, dtype=torch.bfloat16), None
    else:
        from moekit.runtime.prefetch import Prefetcher

        off = load_offloaded(args.model, int(args.budget), "lru", dtype=torch.bfloat16)
        model, store = off.model, off.store
        if args.prefetch != "none" and store is not None:
            Prefetcher(off, args.prefetch, width=8)  # installs itself on every layer's experts
    load_s = time.perf_counter() - t0
    ids = token_stream(args.tokens)
    dec = Decoder(model, max_len=len(ids))
    with torch.no_grad():
        preds = [int(dec.prefill(torch.tensor([ids[:PROMPT]]))[0].argmax())]
        s = store.stats if store is not None else None
        marks = (s.hits, s.misses, s.bytes_read, s.prefetched, s.prefetch_used) if s is not None else ()
        t0 = time.perf_counter()
        for t in ids[PROMPT:]:
            preds.append(int(dec.step(t)[0].argmax()))
        secs = time.perf_counter() - t0
    steps = args.tokens
    rec = {"load_s": load_s, "decode_s": secs, "decode_tokens_per_s": steps / secs, "predictions": preds}
    if s is not None:
        hits, misses = s.hits - marks[0], s.misses - marks[1]
        rec.update(hit_rate=hits / max(hits + misses, 1), experts_per_token=(hits + misses) / steps,
                   bytes_per_token=(s.bytes_read - marks[2]) / steps, bytes_read=s.bytes_read,
                   prefetched=s.prefetched - marks[3], prefetch_used=s.prefetch_used - marks[4],
                   budget_bytes=store.budget_bytes, slot_bytes=store.slot_bytes,
                   peak_cached_bytes=s.peak_cached_bytes, resident_bytes=off.resident_bytes)
    return rec


def _child_llama(args: argparse.Namespace) -> dict:
    """llama.cpp on the GGUF file with mmap, the same stream: prefill, then one `eval` per decode step."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    ids = token_stream(args.tokens)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=len(ids) + 8, n_batch=PROMPT, n_threads=args.threads,
                          n_threads_batch=args.threads, use_mmap=True, use_mlock=False, logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - t0

    def argmax() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    llm.eval(ids[:PROMPT])
    preds = [argmax()]
    t0 = time.perf_counter()
    for t in ids[PROMPT:]:
        llm.eval([t])
        preds.append(argmax())
    secs = time.perf_counter() - t0
    return {"load_s": load_s, "decode_s": secs, "decode_tokens_per_s": args.tokens / secs, "predictions": preds}


def child(args: argparse.Namespace) -> None:
    """One contender, in the capped process: prints one JSON line."""
    from moekit.runtime.offload import peak_rss_bytes

    torch.set_num_threads(args.threads)
    io0 = process_io()
    rec = _child_llama(args) if args.contender == "llama.cpp" else _child_moekit(args)
    io1 = process_io()
    rec.update({k: io1[k] - io0.get(k, 0) for k in io1}, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(rec))


def _headroom(cap_bytes: int) -> int:
    return max(cap_bytes // 8, 128 * MiB)


def bench_large(gb: float, cap_mb: int | None, tokens: int = 16, timeout: float = 1800,
                prefetch: tuple[str, ...] = ("none", "next-layer"), llama: bool = True,
                disk_mb: int | None = None, progress: bool = True) -> list[dict]:
    """The records of every contender (see the module's docstring), each with the run's environment."""
    from moekit.bench import decode_llama
    from moekit.bench.offload import disk_bandwidth, ram_bandwidth
    from moekit.core.tune import cpu_info

    config = large_config(gb)
    threads = torch.get_num_threads()
    slot = 3 * config.hidden_size * config.moe_intermediate_size * 2
    experts = config.num_hidden_layers * config.num_experts * slot

    def say(msg: str) -> None:
        if progress:
            print(f"bench offload --large-gb: {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="moekit-large-") as tmp:
        directory = Path(tmp) / "model"
        t0 = time.perf_counter()
        total = write_random_checkpoint(directory, config)
        env = {"kind": "large", "checkpoint_bytes": total, "expert_bytes": experts, "slot_bytes": slot,
               "layers": config.num_hidden_layers, "experts_per_layer": config.num_experts,
               "k": config.num_experts_per_tok, "new_tokens": tokens, "prompt_tokens": PROMPT, "threads": threads,
               "cpu": cpu_info()["cpu"], "torch": torch.__version__, "generate_s": time.perf_counter() - t0}
        say(f"{total / 1e9:.2f} GB checkpoint written in {env['generate_s']:.0f} s; measuring the disk")
        bw_ram = ram_bandwidth(256)
        bw_disk, t_read = disk_bandwidth(tmp, disk_mb or (1024 if gb >= 1 else 64), slot)
        env.update(bw_ram_gb_s=bw_ram / 1e9, bw_disk_gb_s=bw_disk / 1e9, t_read_us=t_read * 1e6)
        files = sorted(directory.glob("*.safetensors"))
        gguf, llama_note = None, None
        if not llama:
            llama_note = "not asked"
        elif not decode_llama.available():
            llama_note = "llama_cpp not importable or its converter not found (make bench-peers)"
        else:
            say("converting to GGUF (bf16) with llama.cpp's converter")
            t0 = time.perf_counter()
            try:
                gguf = decode_llama.convert(directory, Path(tmp), "bf16")
                env["gguf_bytes"], env["convert_s"] = gguf.stat().st_size, time.perf_counter() - t0
                env["llama_cpp_version"] = decode_llama.version()
            except ConfigError as err:
                llama_note = str(err)
        records: list[dict] = []

        def run(name: str, model: Path, contender: str, budget: int = 0, mode: str = "none") -> dict:
            drop_page_cache(files + ([gguf] if gguf else []))
            say(f"{name} (budget {budget / MiB:.0f} MiB)" if budget else name)
            cmd = [sys.executable, "-m", "moekit.bench.offload_large", "--child", str(model), "--contender",
                   contender, "--budget", str(budget), "--prefetch", mode, "--tokens", str(tokens),
                   "--threads", str(threads)]
            rec = {**env, **run_capped(cmd, cap_mb, timeout), "contender": name}
            if contender == "offload":
                rec["prefetch"] = mode
            records.append(rec)
            return rec

        sizing = run("offload-1-slot", directory, "offload", slot)
        budget = experts // 4
        if records[0]["capped"]:
            if not sizing.get("peak_rss_bytes"):
                records.append({**env, "contender": "offload", "note": "the one-slot run failed; no budget"})
                return records
            budget = cap_mb * MiB - sizing["peak_rss_bytes"] - _headroom(cap_mb * MiB)
        budget = min(budget, experts - slot)
        if budget < slot:
            records.append({**env, "contender": "offload", "note": f"--cgroup-mb={cap_mb}: no room for one expert "
                            f"beside the one-slot run's {sizing['peak_rss_bytes'] / MiB:.0f} MiB"})
        else:
            for mode in prefetch:
                run(f"offload-{mode}", directory, "offload", budget, mode)
        if gguf is not None:
            run("llama.cpp", gguf, "llama.cpp")
        else:
            records.append({**env, "contender": "llama.cpp", "note": llama_note})
        run("resident", directory, "resident")
    finish(records, sizing)
    return records


def finish(records: list[dict], sizing: dict) -> None:
    """Derived fields: the bound of moekit's rows, tokens/s over llama.cpp's, tokens equal to the first moekit row,
    and whether the cache stayed within its budget (peak RSS over the one-slot run's)."""
    from moekit.bench.offload import bound

    anchor = next((r for r in records if r["contender"] == "llama.cpp" and r.get("decode_tokens_per_s")), None)
    first = next((r["predictions"] for r in records if r["contender"].startswith("offload") and r.get("predictions")),
                 None)
    for r in records:
        if r.get("decode_tokens_per_s") and anchor is not None:
            r["vs_llama_cpp"] = r["decode_tokens_per_s"] / anchor["decode_tokens_per_s"]
        if r.get("predictions") and first is not None:
            r["same_tokens_as_offload"] = r["predictions"] == first
            r["predictions_equal_to_offload"] = sum(a == b for a, b in zip(r["predictions"], first, strict=False))
        if r["contender"].startswith("offload") and r.get("experts_per_token"):
            b = bound(1 - r["hit_rate"], r["experts_per_token"], r["slot_bytes"], r["bw_ram_gb_s"] * 1e9,
                      r["bw_disk_gb_s"] * 1e9, r["t_read_us"] * 1e-6)
            r["bound_tokens_per_s"] = b
            r["of_bound"] = r["decode_tokens_per_s"] / b if b else None
        if r is not sizing and r.get("budget_bytes") and sizing.get("peak_rss_bytes") and r.get("peak_rss_bytes"):
            r["rss_over_one_slot_bytes"] = r["peak_rss_bytes"] - sizing["peak_rss_bytes"]
            r["budget_honoured"] = r["rss_over_one_slot_bytes"] <= r["budget_bytes"] + 2 * r["slot_bytes"] + 32 * MiB


def summary(records: list[dict]) -> str:
    """The lines to paste: per contender tokens/s, over llama.cpp, peak memory against the cap, OOM."""
    large = [r for r in records if r.get("kind") == "large"]
    if not large:
        return ""
    r0 = large[0]
    cap = r0.get("cap_mb")
    capped = f"cgroup v1 cap {cap} MiB, page cache counted" if cap else f"UNCAPPED ({r0.get('cgroup_note')}): RSS only"
    head = (f"larger than memory: {r0['checkpoint_bytes'] / 1e9:.2f} GB random Qwen3-MoE ({r0['layers']} layers x "
            f"{r0['experts_per_layer']} experts, top-{r0['k']}, bf16), {r0['new_tokens']} decode steps after "
            f"{r0['prompt_tokens']}, {r0['threads']} threads; {capped}; disk {r0['bw_disk_gb_s']:.2f} GB/s, "
            f"{r0['t_read_us']:.0f} us/read, RAM {r0['bw_ram_gb_s']:.1f} GB/s")
    lines = [head, f"{'contender':<18}{'tok/s':>9}{'vs llama':>9}{'bound':>8}{'hit':>6}{'budget MiB':>11}"
             f"{'peak cg MiB':>12}{'at cap':>7}{'VmHWM MiB':>10}{'disk MiB':>10}  exit  OOM  tokens"]
    for r in large:
        def f(key: str, fmt: str, scale: float = 1.0, r: dict = r) -> str:
            v = r.get(key)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            return format(v / scale, fmt) if number else "-".rjust(int(fmt.split(".")[0]))

        same = "-" if r.get("same_tokens_as_offload") is None else \
            f"{r['predictions_equal_to_offload']}/{len(r['predictions'])} as offload"
        lines.append(f"{r['contender']:<18}{f('decode_tokens_per_s', '9.3f')}{f('vs_llama_cpp', '9.2f')}"
                     f"{f('bound_tokens_per_s', '8.2f')}{f('hit_rate', '6.2f')}{f('budget_bytes', '11.0f', MiB)}"
                     f"{f('peak_cgroup_bytes', '12.0f', MiB)}{f('failcnt', '7.0f')}{f('peak_rss_bytes', '10.0f', MiB)}"
                     f"{f('disk_read_bytes', '10.0f', MiB)}  {str(r.get('exit_code', '-')):>4}  "
                     f"{'yes' if r.get('oom_killed') else 'no':>3}  {same}" + (f"  ({r['note']})" if r.get("note")
                                                                                   else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", dest="model", required=True)
    p.add_argument("--contender", choices=["offload", "resident", "llama.cpp"], required=True)
    p.add_argument("--budget", default="0")
    p.add_argument("--prefetch", default="none")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    child(p.parse_args())
