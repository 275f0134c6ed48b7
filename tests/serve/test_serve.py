"""`moekit serve` end to end: the official openai client against a server started here on a free local port
(completions, chat, streaming, stop, seeds), streamed chunks assembling to the non-streamed text, greedy text equal
to the Decoder's, a client that leaves mid-stream freeing its row, and bad input answered with OpenAI-style 4xx
bodies while the server keeps serving."""

import asyncio
import time

import httpx
import openai
import pytest

from moekit.runtime.decode import Decoder
from moekit.serve.app import create_app
from moekit.serve.server import ServerThread, build_engine

MODEL = "moekit-tiny"


@pytest.fixture(scope="module")
def server():
    engine = build_engine(max_batch=3, max_queue=6, max_wait=2)
    engine.start()
    srv = ServerThread(create_app(engine, MODEL)).start()
    yield srv, engine
    srv.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(engine, prompt: str, n: int) -> str:
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    out = Decoder(engine.model).generate(ids, n)
    return engine.tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0].url + "/health").json()["status"] == "ok"


def test_completion_greedy_equals_decoder_and_stream_assembles(server, client):
    engine = server[1]
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy(engine, "def add(a, b):", 10)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.tokenizer("def add(a, b):").input_ids),
                                                                  10)
    chunks = list(client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0,
                                            stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_greedy_text_equals_moekit_generate(client, capsys):
    import json

    from moekit.cli.main import main

    assert main(["generate", "--prompt", "The history of", "--max-new-tokens", "12", "--json"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    r = client.completions.create(model=MODEL, prompt="The history of", max_tokens=12, temperature=0)
    assert r.choices[0].text == want


def test_chat_and_chat_stream(client):
    msgs = [{"role": "user", "content": "Write a loop in Python."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens == 8


def test_sampling_seed_and_stop(client):
    kw = {"model": MODEL, "prompt": "The river", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9}
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text  # the seed makes it reproducible
    full = client.completions.create(model=MODEL, prompt="The river", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt="The river", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_client_leaving_mid_stream_frees_its_row(server):
    url = server[0].url
    before = metric(url, "moekit_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one chunk read, then the connection closes
    deadline = time.monotonic() + 30
    while metric(url, "moekit_requests_cancelled_total") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "moekit_requests_cancelled_total") == before + 1
    assert metric(url, "moekit_running") == 0 and metric(url, "moekit_queue_depth") == 0


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, "invalid_json"),
    (b'{"prompt": "hi"}', 400, "model", None),
    (b'{"model": "moekit-tiny"}', 400, "prompt", None),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model", "model_not_found"),
    (b'{"model": "moekit-tiny", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens", None),
    (b'{"model": "moekit-tiny", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens", "context_length_exceeded"),
    (b'{"model": "moekit-tiny", "prompt": "' + b"word " * 600 + b'"}', 400, "prompt", "context_length_exceeded"),
    (b'{"model": "moekit-tiny", "prompt": "hi", "temperature": "hot"}', 400, "temperature", None),
    (b'[1, 2]', 400, None, "invalid_json"),
    (b'{"model": "moekit-tiny", "prompt": [1, 99999]}', 400, "prompt", None),
])
def test_bad_input_gets_openai_errors(server, body, status, param, code):
    url = server[0].url
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2  # still serving


def test_bad_chat_messages(server):
    url = server[0].url + "/v1/chat/completions"
    for messages, param in (([{"role": "user"}], "messages[0]"), ([], "messages"), (None, "messages")):
        r = httpx.post(url, json={"model": MODEL, "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_requests_beyond_the_queue_get_429_and_the_rest_complete(server, client):
    url = server[0].url

    async def burst():
        async with httpx.AsyncClient(timeout=120) as ac:
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
            return await asyncio.gather(*(ac.post(url + "/v1/completions", json=body) for _ in range(100)))

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 6
    for r in replies:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 3
    assert len({r.json()["choices"][0]["text"] for r in replies if r.status_code == 200}) == 1  # same prompt, same text
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices[0].text
