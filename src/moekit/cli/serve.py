"""`moekit serve [MODEL] [--host 127.0.0.1] [--port 8000] [--expert-memory SIZE] [--max-batch N]`: an
OpenAI-compatible HTTP server (completions, chat, streaming, /metrics) with continuous, expert-aware batching."""

from __future__ import annotations

import argparse

HELP = "serve a model over the OpenAI HTTP API (continuous expert-aware batching, SSE streaming, /metrics)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a local Hugging Face MoE checkpoint directory (default: moekit-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--expert-memory", default=None, metavar="SIZE",
                   help="keep routed experts on disk, at most SIZE of them in memory ('2GB', '25%%', bytes)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per decode step (default 8)")
    p.add_argument("--max-running", type=int, default=None,
                   help="sequences kept in the KV cache (default: --max-batch); above it, each step's rows are "
                        "chosen among them by --scheduler")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running batch before 429 (default 64)")
    p.add_argument("--max-wait", type=int, default=8,
                   help="steps (or admissions) a sequence can be passed over by the scheduler (default 8)")
    p.add_argument("--scheduler", choices=["expert", "first-come"], default="expert",
                   help="how waiting requests join the batch (default expert: fewest new experts)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype (default fp32)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from moekit.serve.app import create_app
    from moekit.serve.engine import RequestError
    from moekit.serve.server import build_engine, check_bind, model_id_of

    if not 0 < args.port < 65536:
        raise RequestError(f"--port {args.port}: expected 1..65535")
    check_bind(args.host, args.port)
    engine = build_engine(args.model, dtype=args.dtype, expert_memory=args.expert_memory, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_wait=args.max_wait, scheduler=args.scheduler,
                          max_running=args.max_running)
    model_id = model_id_of(args.model)
    engine.start()
    print(f"moekit serve: {model_id} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"{args.scheduler} batching)", flush=True)
    try:
        uvicorn.run(create_app(engine, model_id), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
