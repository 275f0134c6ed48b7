"""`moekit bench serve`: `moekit serve` under load on localhost, from streaming HTTP clients (httpx, SSE).

Three measurements, each against its baseline in the same run (rounds interleaved, medians over rounds):
- concurrency: aggregate generated tokens/s with 8 concurrent clients against 1 client;
- load: `clients` concurrent streaming clients for `seconds`: p50/p99 request latency, time to first token,
  tokens/s; every request checked: answered completely (a final chunk with a finish reason) and its text equal
  to the greedy text of its own prompt computed alone beforehand (a text equal to another prompt's counts as mixed
  up);
- scheduler: with `resident` x max_batch sequences resident and max_batch rows per forward, expert-aware row choice
  (runtime.schedule.pick_batch on each row's predicted experts, bounded wait) against first-come (longest wait) at
  the same offered load: distinct (layer, expert) pairs activated per decode step (from /metrics), rows per step,
  tokens/s, p99 latency.
The concurrency and load phases run plain continuous batching (max_running = max_batch).
Prompts are 8 distinct openings of moekit-tiny's held-out documents; temperature 0; the servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import torch

PROMPTS = 8


def _prompts(tokenizer, n: int = PROMPTS, tokens: int = 24) -> list[str]:
    from moekit.default import default_test_split

    docs = [d["text"] for d in default_test_split() if len(d["text"]) > 200]
    step = max(1, len(docs) // n)
    return [tokenizer.decode(tokenizer(docs[i * step][:400]).input_ids[:tokens]) for i in range(n)]


def _references(engine, prompts: list[str], max_tokens: int) -> list[str]:
    from moekit.runtime.decode import Decoder

    tok, out = engine.tokenizer, []
    for p in prompts:
        res = Decoder(engine.model).generate(tok(p, return_tensors="pt").input_ids, max_tokens)
        out.append(tok.decode(res.tokens[0], skip_special_tokens=True))
    return out


async def _client(ac: httpx.AsyncClient, url: str, cid: int, deadline: float, prompts: list[str], max_tokens: int,
                  log: list[dict]) -> None:
    n = 0
    while time.perf_counter() < deadline:
        i = (cid + n) % len(prompts)
        n += 1
        body = {"model": "moekit-tiny", "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        rec = {"prompt": i, "start": time.perf_counter(), "first": None, "text": "", "finish": None, "tokens": 0,
               "status": None}
        try:
            async with ac.stream("POST", url + "/v1/completions", json=body) as resp:
                rec["status"] = resp.status_code
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if obj.get("usage"):
                        rec["tokens"] = obj["usage"]["completion_tokens"]
                    for ch in obj.get("choices", []):
                        if ch.get("text") and rec["first"] is None:
                            rec["first"] = time.perf_counter()
                        rec["text"] += ch.get("text") or ""
                        rec["finish"] = ch.get("finish_reason") or rec["finish"]
        except httpx.HTTPError as err:
            rec["error"] = f"{type(err).__name__}: {err}"
        rec["end"] = time.perf_counter()
        log.append(rec)


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name] = float(value)
    return out


def _round(url: str, clients: int, seconds: float, prompts: list[str], refs: list[str], max_tokens: int) -> dict:
    """`clients` streaming clients for `seconds`; what they saw and what /metrics counted meanwhile."""
    log: list[dict] = []

    async def run() -> None:
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as ac:
            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(_client(ac, url, c, deadline, prompts, max_tokens, log)
                                   for c in range(clients)))

    before = _metrics(url)
    start = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - start
    after = _metrics(url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    ok = [r for r in log if r["status"] == 200 and r["finish"] is not None and "error" not in r]
    latency = sorted(r["end"] - r["start"] for r in ok)
    ttft = sorted(r["first"] - r["start"] for r in ok if r["first"] is not None)
    wrong = [r for r in ok if r["text"] != refs[r["prompt"]]]
    steps = max(delta.get("moekit_decode_steps_total", 0), 1)
    return {"clients": clients, "seconds": wall, "requests": len(log), "completed": len(ok),
            "incomplete": len(log) - len(ok), "text_differs": len(wrong),
            "mixed_up": sum(r["text"] in refs and r["text"] != refs[r["prompt"]] for r in wrong),
            "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": _pct(latency, 50), "latency_p99_s": _pct(latency, 99), "ttft_p50_s": _pct(ttft, 50),
            "experts_per_step": delta.get("moekit_activated_experts_total", 0) / steps,
            "rows_per_step": delta.get("moekit_decode_rows_total", 0) / steps}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _median(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if r[key] is not None]
    return statistics.median(vals) if vals else None


def bench_serve(clients: int = 32, seconds: float = 120.0, quick: bool = False, max_batch: int = 8,
                max_tokens: int = 32, rounds: int = 3, resident: int = 4) -> list[dict]:
    from moekit.core.tune import cpu_info
    from moekit.serve.app import create_app
    from moekit.serve.engine import Engine
    from moekit.serve.server import ServerThread, build_engine

    if quick:
        clients, seconds, max_tokens, rounds, max_batch = min(clients, 8), min(seconds, 4.0), 8, 1, min(max_batch, 4)
    plain = build_engine(max_batch=max_batch, max_queue=4 * clients)
    engines = {"plain": plain, **{name: Engine(plain.model, plain.tokenizer, max_batch=max_batch,
                                               max_running=resident * max_batch, max_queue=4 * clients,
                                               scheduler=name)
                                  for name in ("expert", "first-come")}}
    prompts = _prompts(plain.tokenizer)
    refs = _references(plain, prompts, max_tokens)
    servers = {}
    for name, eng in engines.items():
        eng.start()
        servers[name] = ServerThread(create_app(eng, "moekit-tiny")).start()
    base = {"bench": "serve", **cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "max_batch": max_batch, "max_tokens": max_tokens, "quick": quick,
            "scheduler_max_running": resident * max_batch}
    records: list[dict] = []
    try:
        url = servers["plain"].url
        short = max(seconds / (4 * rounds), 2.0)
        conc = {1: [], 8: []}
        for _ in range(rounds):  # interleaved: 1 client, 8 clients, 1, 8, ...
            for n in (1, 8):
                conc[n].append(_round(url, n, short, prompts, refs, max_tokens))
        for n, recs in conc.items():
            records.append({**base, "phase": "concurrency", "clients": n, "rounds": len(recs),
                            "tokens_per_s": _median(recs, "tokens_per_s"),
                            "latency_p50_s": _median(recs, "latency_p50_s"),
                            "incomplete": sum(r["incomplete"] for r in recs)})
        one, eight = records[-2]["tokens_per_s"], records[-1]["tokens_per_s"]
        records.append({**base, "phase": "concurrency_ratio", "eight_over_one": eight / one if one else None})
        load = _round(url, clients, seconds, prompts, refs, max_tokens)
        records.append({**base, "phase": "load", "scheduler": "plain", **load})
        sched = {"expert": [], "first-come": []}
        for _ in range(rounds):  # interleaved at the same offered load
            for name in sched:
                sched[name].append(_round(servers[name].url, clients, seconds / (2 * rounds), prompts, refs,
                                          max_tokens))
        for name, recs in sched.items():
            records.append({**base, "phase": "scheduler", "scheduler": name, "clients": clients, "rounds": len(recs),
                            **{k: _median(recs, k) for k in ("experts_per_step", "rows_per_step", "tokens_per_s",
                                                             "latency_p99_s")},
                            "incomplete": sum(r["incomplete"] for r in recs),
                            "text_differs": sum(r["text_differs"] for r in recs)})
        e, f = records[-2]["experts_per_step"], records[-1]["experts_per_step"]
        records.append({**base, "phase": "scheduler_ratio",
                        "expert_aware_reduction": 1 - e / f if e is not None and f else None,
                        "max_wait_steps": engines["expert"].max_wait,
                        "max_wait_seen": engines["expert"].stats.get("max_wait_seen")})
    finally:
        for name, srv in servers.items():
            srv.stop()
            engines[name].stop()
    return records


COLUMNS = ["phase", "scheduler", "clients", "requests", "completed", "incomplete", "text_differs", "mixed_up",
           "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "experts_per_step", "rows_per_step",
           "eight_over_one", "expert_aware_reduction"]
