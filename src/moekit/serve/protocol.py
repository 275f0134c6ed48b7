"""The OpenAI request and response shapes `moekit serve` speaks, as plain functions (no HTTP): parse a request body
into what the engine needs, build response objects and stream chunks, and OpenAI-style error bodies
{"error": {"message", "type", "param", "code"}}.

Chat prompts use the tokenizer's chat template when it has one; otherwise the plain fallback
"<role>: <content>\\n" per message followed by "assistant:" (moekit-tiny has no template).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from moekit.runtime.decode import Sampling
from moekit.serve.engine import RequestError

FALLBACK_TEMPLATE = "{role}: {content}\n"
MAX_STOP = 4


@dataclass
class Params:
    """A parsed completion or chat request."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"We could not parse the JSON body of your request ({err.__class__.__name__}: {err}); "
                           "expected a JSON object", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {type(body).__name__}", None, "invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"{name}={value!r}: expected a number in [{lo}, {hi}]", name)
    return float(value)


def _int(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}={value!r}: expected an integer", name)
    return value


def chat_prompt(tokenizer, messages) -> str:
    """The prompt text of `messages` (list of {"role", "content"})."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}]: expected an object with string 'role' and 'content'",
                               f"messages[{i}]")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    return "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"


def parse_request(body: dict, tokenizer, model_ids: list[str], context: int, chat: bool) -> Params:
    """Params of a /v1/completions (chat=False) or /v1/chat/completions body; RequestError names the field."""
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model: required, a string (see GET /v1/models)", "model")
    if model not in model_ids:
        raise RequestError(f"The model '{model}' does not exist; this server serves {model_ids}", "model",
                           "model_not_found")
    if chat:
        ids = tokenizer(chat_prompt(tokenizer, body.get("messages"))).input_ids
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt: required, a string (or a list of token ids); batched prompts are not "
                               "supported", "prompt")
    if _int(body, "n", 1) != 1:
        raise RequestError("n: only 1 completion per request is supported", "n")
    default_max = 16 if not chat else max(1, min(256, context - len(ids)))
    max_tokens = _int(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      default_max)
    if max_tokens < 1:
        raise RequestError(f"max_tokens={max_tokens}: expected a positive integer", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = _int(body, "seed", None)
    if temperature == 0:
        sampling = None
    else:
        if top_p == 0:
            raise RequestError("top_p=0: expected a number in (0, 1]", "top_p")
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop: expected a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream: expected true or false", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return Params(model, ids, max_tokens, sampling, tuple(stop), stream, include_usage)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def response(rid: str, model: str, chat: bool, text: str, finish: str, usage: dict) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False,
          usage: dict | None = None) -> dict:
    """One streamed chunk; `usage` set: the final usage-only chunk (no choices)."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model}
    if usage is not None:
        return {**out, "choices": [], "usage": usage}
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    return out
