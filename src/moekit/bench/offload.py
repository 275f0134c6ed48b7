"""`moekit bench offload [MODEL]`: a model run with its experts on disk, every budget x policy x prefetch mode
side by side (interleaved rounds, medians), against the fully resident model and the physical bound, plus the same
policies in trace replay with Belady as the ceiling.

Live: greedy decoding of held-out prompts through `Decoder.prefill` / `step`; per run the decode tokens/s, hit rate,
expert bytes read per token, peak cache bytes and peak RSS (sampled), and whether the tokens equal the resident
model's. The bound, with B = expert bytes per token, m = miss rate, n = experts per token, all measured in this
run: tok/s <= 1 / ((1 - m) B / BW_ram + m B / BW_disk + m n t_read); BW_ram from tensor copies, BW_disk and t_read
from reads of a scratch file after `posix_fadvise(DONTNEED)` (the page cache emptied for it).
Replay: traces of the model on the training and held-out halves of its documents; the path predictor is trained on
the first and every policy, with and without its predictions, replayed on the second.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from moekit.core.tune import cpu_info
from moekit.runtime.offload import load_offloaded, peak_rss_bytes
from moekit.runtime.prefetch import Prefetcher, predicted_routes, train_predictor
from moekit.runtime.replay import Routes, compare
from moekit.runtime.schedule import simulate

BUDGETS = (0.125, 0.25, 0.5, 1.0)
POLICIES = ("lru", "lfu", "lfuda", "moe-infinity", "layer-lru")
PREFETCH = ("none", "next-layer", "predictor")
COLUMNS = ["kind", "budget", "policy", "prefetch", "decode_tokens_per_s", "vs_resident", "hit_rate",
           "bytes_per_token", "bound_tokens_per_s", "of_bound", "peak_rss_mb", "lossless", "gap_closed", "scheduler",
           "experts_per_step"]


class RssSampler:
    """Peak RSS of this process while running (sampled every 5 ms from /proc/self/statm)."""

    def __enter__(self) -> RssSampler:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ram_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s read by a tensor copy (median)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / statistics.median(times)


def disk_bandwidth(directory: str, mb: int, chunk: int, probes: int = 64) -> tuple[float, float]:
    """(bytes/s reading `chunk`-sized ranges in order, median seconds of one 4 KiB read at a random offset), both
    with the file's pages dropped from the page cache first."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".moekit-disk-")
    try:
        block = os.urandom(2**20)
        for _ in range(mb):
            os.write(fd, block)
        os.fsync(fd)
        size = mb * 2**20
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunk = max(4096, min(chunk, size))
        t0 = time.perf_counter()
        for off in range(0, size - chunk + 1, chunk):
            os.pread(fd, chunk, off)
        bw = (size // chunk) * chunk / (time.perf_counter() - t0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        g = torch.Generator().manual_seed(0)
        lat = []
        for off in torch.randint(0, size // 4096, (probes,), generator=g).tolist():
            t0 = time.perf_counter()
            os.pread(fd, 4096, off * 4096)
            lat.append(time.perf_counter() - t0)
        return bw, statistics.median(lat)
    finally:
        os.close(fd)
        os.unlink(name)


def bound(m: float, n: float, slot: int, bw_ram: float, bw_disk: float, t_read: float) -> float | None:
    b = n * slot
    denom = (1 - m) * b / bw_ram + m * b / bw_disk + m * n * t_read
    return None if denom <= 0 else 1 / denom


@torch.no_grad()
def greedy(model, prompts: list[torch.Tensor], new: int, before=None, on_prefilled=None
           ) -> tuple[list[list[int]], float, int]:
    """Greedy tokens per prompt, decode seconds and decode tokens (prefill excluded). `before` runs before each
    prompt, `on_prefilled` after its prefill."""
    from moekit.runtime.decode import Decoder

    dec = Decoder(model, max_len=max(p.numel() for p in prompts) + new)
    out, secs, steps = [], 0.0, 0
    for ids in prompts:
        if before is not None:
            before()
        logits = dec.prefill(ids.unsqueeze(0))
        if on_prefilled is not None:
            on_prefilled()
        toks = [int(logits[0].argmax())]
        t0 = time.perf_counter()
        for _ in range(new - 1):
            toks.append(int(dec.step(toks[-1])[0].argmax()))
        secs += time.perf_counter() - t0
        steps += new - 1
        out.append(toks)
    return out, secs, steps


def _prompts(tokenizer, docs, count: int, length: int) -> list[torch.Tensor]:
    out = []
    for d in docs:
        ids = tokenizer(d.text, return_tensors="pt").input_ids[0][:length]
        if ids.numel() >= 4:
            out.append(ids)
        if len(out) == count:
            break
    return out


def live_run(path, budget, policy, prefetch, prompts, new, predictor, dtype, reference, disk) -> dict:
    off = load_offloaded(path, f"{budget * 100:g}%", policy, dtype=dtype)
    pf = Prefetcher(off, prefetch, predictor=predictor, width=2) if prefetch != "none" and off.store else None
    stats = off.store.stats if off.store else None
    marks = {}

    counts = {"h": 0, "m": 0, "b": 0}

    def start():
        if pf is not None:
            pf.begin_request()

    def mark():  # after a prefill: count decode steps only
        if stats is not None:
            marks.update(h=stats.hits, m=stats.misses, b=stats.bytes_read)

    def end():
        if stats is not None and marks:
            counts["h"] += stats.hits - marks["h"]
            counts["m"] += stats.misses - marks["m"]
            counts["b"] += stats.bytes_read - marks["b"]
            marks.clear()

    def before():
        end()
        start()

    with RssSampler() as rss:
        tokens, secs, steps = greedy(off.model, prompts, new, before, mark)
        end()
    rec = {"kind": "live", "budget": budget, "policy": policy, "prefetch": prefetch,
           "decode_tokens_per_s": steps / secs, "lossless": tokens == reference, "peak_rss_bytes": rss.peak,
           "note": off.note}
    if stats is not None:
        hits, misses = counts["h"], counts["m"]
        n = (hits + misses) / max(steps, 1)
        m = misses / max(hits + misses, 1)
        rec.update(hit_rate=1 - m, bytes_per_token=counts["b"] / max(steps, 1),
                   experts_per_token=n, slot_bytes=off.store.slot_bytes, peak_cached_bytes=stats.peak_cached_bytes,
                   budget_bytes=off.store.budget_bytes,
                   bound_tokens_per_s=bound(m, n, off.store.slot_bytes, *disk))
    else:
        rec.update(hit_rate=1.0, bytes_per_token=0)
    off.close()
    return rec


def schedule_records(routes: Routes, env: dict, sequences: int = 16, max_batch: int = 4, max_wait: int = 8
                     ) -> list[dict]:
    """ExpertFlow token scheduling on the held-out trace: its tokens cut into `sequences` concurrent sequences,
    decoded `max_batch` at a time, expert-aware (`pick_batch`) against first-come; a token's experts are its
    (layer, expert) pairs."""
    n = routes.num_tokens // sequences
    if n < 2:
        return []
    rows = [x.tolist() for x in routes.indices]
    E = max(routes.num_experts)
    per_token = [{i * E + e for i in range(routes.num_layers) for e in rows[i][t] if e >= 0}
                 for t in range(n * sequences)]
    seqs = [per_token[s * n:(s + 1) * n] for s in range(sequences)]
    out = [{"kind": "schedule", "sequences": sequences, "max_batch": max_batch, "max_wait": max_wait,
            **simulate(seqs, max_batch, max_wait, scheduler), **env} for scheduler in ("expert", "first-come")]
    out[0]["experts_per_step_vs_first_come"] = out[0]["experts_per_step"] / out[1]["experts_per_step"]
    return out


def bench_offload(model_path: str | None = None, quick: bool = False, repeats: int = 3, new_tokens: int = 32,
                  dtype: torch.dtype = torch.float32, progress: bool = True, save_predictor: str | None = None
                  ) -> list[dict]:
    import moekit.hf as mh
    from moekit.data import default_documents
    from moekit.default import default_model_path
    from moekit.inspect.trace import trace
    from moekit.runtime.decode import load_for_decode

    path = Path(default_model_path() if model_path is None else model_path)
    if save_predictor is not None:
        from moekit.files import check_output

        check_output(save_predictor, [path], flag="--save-predictor")
    resident, tok = load_for_decode(str(path), dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    docs = list(default_documents())
    train_docs, held_docs = docs[0::2], docs[1::2]
    prompts = _prompts(tok, held_docs, 2 if quick else 8, 16 if quick else 64)
    new = 4 if quick else new_tokens
    _, secs, steps = greedy(resident, prompts, new)  # dispatch's own choice: the speed to compare with
    resident_tps = steps / secs
    mh.accelerate(resident, "loop")  # the offloaded experts run dispatch's loop: the same sums, the same tokens
    reference, _, _ = greedy(resident, prompts, new)
    cap = 512 if quick else 16384
    train_routes = Routes.from_trace(tr := trace(resident, train_docs, tok, max_tokens=cap, progress=progress))
    predictor = train_predictor(train_routes, tr.token_ids, resident.config.vocab_size, epochs=2 if quick else 20)
    if save_predictor is not None:
        predictor.save(save_predictor)
    held = trace(resident, held_docs, tok, max_tokens=cap, progress=progress)
    del resident
    probe = load_offloaded(path, "100%", dtype=dtype)
    slot = max(1, probe.expert_bytes // sum(held.num_experts))
    probe.close()
    bw_ram = ram_bandwidth(32 if quick else 256)
    bw_disk, t_read = disk_bandwidth(str(path.parent if os.access(path.parent, os.W_OK) else tempfile.gettempdir()),
                                     16 if quick else 1024, slot)
    disk = (bw_ram, bw_disk, t_read)
    budgets = (0.25, 1.0) if quick else BUDGETS
    configs = [(b, p, f) for b in budgets for p in (("lru",) if quick else POLICIES)
               for f in (("none", "next-layer") if quick else PREFETCH) if b < 1 or (p == "lru" and f == "none")]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(1 if quick else repeats):  # interleaved rounds
        for c in configs:
            runs[c].append(live_run(path, *c, prompts, new, predictor if c[2] == "predictor" else None, dtype,
                                    reference, disk))
    env = {"cpu": cpu_info()["cpu"], "cpu_flags": cpu_info()["cpu_flags"], "torch": torch.__version__,
           "threads": torch.get_num_threads(), "model": str(path), "dtype": str(dtype).replace("torch.", ""),
           "bw_ram_gb_s": bw_ram / 1e9, "bw_disk_gb_s": bw_disk / 1e9, "t_read_us": t_read * 1e6,
           "prompts": len(prompts), "new_tokens": new, "repeats": 1 if quick else repeats}
    records = [{"kind": "resident", "decode_tokens_per_s": resident_tps, "vs_resident": 1.0, "hit_rate": 1.0,
                "peak_rss_bytes": peak_rss_bytes(), **env}]
    for rs in runs.values():
        rec = dict(rs[0])
        rec["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in rs)
        rec["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rs)
        rec["lossless"] = all(r["lossless"] for r in rs)
        rec["vs_resident"] = rec["decode_tokens_per_s"] / resident_tps
        if rec.get("bound_tokens_per_s"):
            rec["of_bound"] = rec["decode_tokens_per_s"] / rec["bound_tokens_per_s"]
        records.append({**rec, **env})
    held_routes = Routes.from_trace(held)
    preds = {"predictor": predicted_routes(predictor, held_routes, held.token_ids, list(held.k))}
    for r in compare(held_routes, [*POLICIES, "belady"], list(budgets[:-1]) or [0.25], predictions=preds,
                     expert_bytes=slot):
        records.append({"kind": "replay", **{k: v for k, v in r.items() if k != "hit_rate_per_layer"},
                        "hit_rate_per_layer": r["hit_rate_per_layer"], **env})
    records += schedule_records(held_routes, env)
    for r in records:
        if "peak_rss_bytes" in r:
            r["peak_rss_mb"] = round(r["peak_rss_bytes"] / 2**20, 1)
    return records
