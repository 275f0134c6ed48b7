"""The HTTP layer of `moekit serve` (FastAPI): routes that parse requests (`protocol`), hand them to the `Engine`
(which knows nothing of HTTP and runs in its own thread) and turn its events into OpenAI responses or server-sent
events. Errors are OpenAI-style bodies: 400 invalid request, 404 unknown model, 429 queue full."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.serve import protocol
from moekit.serve.engine import Engine, QueueFull, RequestError
from moekit.serve.engine import Request as EngineRequest

PROM = (("moekit_requests_total", "counter", "requests accepted", "requests"),
        ("moekit_requests_finished_total", "counter", "requests answered completely", "requests_finished"),
        ("moekit_requests_cancelled_total", "counter", "requests whose client went away", "requests_cancelled"),
        ("moekit_requests_rejected_total", "counter", "requests refused because the queue was full",
         "requests_rejected"),
        ("moekit_prompt_tokens_total", "counter", "prompt tokens prefilled", "prompt_tokens"),
        ("moekit_generation_tokens_total", "counter", "tokens generated", "completion_tokens"),
        ("moekit_decode_steps_total", "counter", "batched decode steps", "steps"),
        ("moekit_decode_rows_total", "counter", "sequence rows over all decode steps", "batch_rows"),
        ("moekit_activated_experts_total", "counter", "distinct (layer, expert) pairs per step, summed",
         "activated_experts"),
        ("moekit_queue_depth", "gauge", "requests waiting for a batch row", "queue_depth"),
        ("moekit_batch_size", "gauge", "rows in the last decode step", "last_batch"),
        ("moekit_activated_experts", "gauge", "distinct (layer, expert) pairs the last step activated",
         "last_activated"),
        ("moekit_running", "gauge", "sequences in the running batch", "running"),
        ("moekit_expert_cache_hit_rate", "gauge", "offloaded expert cache hit rate (absent: all resident)",
         "cache_hit_rate"))


def prometheus(metrics: dict) -> str:
    lines = []
    for name, kind, help_, key in PROM:
        if metrics.get(key) is None:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {metrics[key]}"]
    return "\n".join(lines) + "\n"


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, type_, param, code), status_code=status)


def create_app(engine: Engine, model_id: str) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_id` (start the engine's thread separately)."""
    app = FastAPI(title="moekit serve")
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "moekit"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")

    async def generate(request: Request, chat: bool):
        try:
            params = protocol.parse_request(protocol.parse_json(await request.body()), engine.tokenizer,
                                            [model_id], engine.context, chat)
            engine.check(params.prompt_ids, params.max_tokens)
        except RequestError as err:
            status = 404 if err.code == "model_not_found" else 400
            return _error(status, str(err), param=err.param, code=err.code)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rid = protocol.new_id(chat)
        req = EngineRequest(params.prompt_ids, params.max_tokens,
                            lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), params.sampling,
                            params.stop, rid)
        try:
            engine.submit(req)
        except QueueFull as err:
            return _error(429, str(err), "rate_limit_error", None, "queue_full")
        if params.stream:
            return StreamingResponse(_stream(engine, events, rid, params, chat), media_type="text/event-stream")
        try:
            while True:
                ev = await events.get()
                if ev["type"] == "done":
                    return protocol.response(rid, params.model, chat, ev["text"], ev["finish_reason"], ev["usage"])
                if ev["type"] == "error":
                    return _error(500, ev["message"], "server_error")
        finally:
            engine.cancel(rid)  # a no-op once done; frees the row if the client went away

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def _stream(engine: Engine, events: asyncio.Queue, rid: str, params: protocol.Params, chat: bool):
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    first = True
    try:
        if chat:
            yield sse(protocol.chunk(rid, params.model, chat, "", None, first=True))
            first = False
        while True:
            ev = await events.get()
            if ev["type"] == "delta":
                yield sse(protocol.chunk(rid, params.model, chat, ev["text"], None, first=first))
                first = False
            elif ev["type"] == "done":
                yield sse(protocol.chunk(rid, params.model, chat, None, ev["finish_reason"]))
                if params.include_usage:
                    yield sse(protocol.chunk(rid, params.model, chat, None, None, usage=ev["usage"]))
                break
            else:
                yield sse(protocol.error_body(ev["message"], "server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(rid)  # the client disconnected mid-stream (or we are done): free the row
