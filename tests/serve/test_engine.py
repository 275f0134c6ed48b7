"""The serving engine without HTTP: continuous batching gives every request the text it gets alone (greedy, none
mixed up), requests join and leave between steps, and expert-aware admission picks the ready request that shares
the running rows' experts unless another waited too long."""

import pytest

from moekit.runtime.decode import Decoder
from moekit.runtime.schedule import pick_first_come
from moekit.serve.engine import Engine, QueueFull, Request, RequestError, choose_ready
from moekit.serve.server import build_engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_engine(max_batch=3, max_queue=8)


@pytest.mark.parametrize(("max_running", "max_len"), [(None, None), (5, None), (5, 17)])
def test_continuous_batching_matches_each_request_alone(engine, max_running, max_len):
    """Rows join and leave mid-batch; with 5 resident rows and 3 per forward the scheduler picks each step's rows
    (the others get holes in their cache); with a 17-position cache the holes must be compacted away."""
    if max_running is not None:
        engine = Engine(engine.model, engine.tokenizer, max_batch=3, max_running=max_running, max_len=max_len,
                        max_wait=2)
    tok = engine.tokenizer
    prompts = ["The cat", "def f(x):", "Once upon a time there", "import numpy", "Hello", "The river flows"]
    lengths = [9, 4, 7, 12, 3, 6]  # different lengths: rows leave and others join mid-batch
    events: dict[int, list[dict]] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.submit(Request(tok(p).input_ids, n, lambda ev, i=i: events.setdefault(i, []).append(ev), id=str(i)))
    before = dict(engine.stats)
    engine.run_until_idle()
    st = engine.stats
    assert st["requests_finished"] - before["requests_finished"] == 6
    rows = st["batch_rows"] - before["batch_rows"]
    steps = st["steps"] - before["steps"]
    assert rows / steps > 1.5  # several sequences per forward (one at a time would be 1)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        done = events[i][-1]
        assert done["type"] == "done" and done["usage"]["completion_tokens"] == n
        assert "".join(e["text"] for e in events[i][:-1]) == done["text"]
        ref = Decoder(engine.model).generate(tok(p, return_tensors="pt").input_ids, n)
        assert done["text"] == tok.decode(ref.tokens[0], skip_special_tokens=True), i
    assert not engine.busy
    if max_running is not None:
        assert st["max_wait_seen"] <= 2 + 1  # passed over at most max_wait steps, then taken first
        assert rows / steps <= 3
    if max_len is not None:
        assert st["compactions"] > 0


def test_expert_memory_serves_the_same_text(engine):
    """--expert-memory: experts read on demand from the checkpoint (runtime.offload); same greedy text, hit rate
    reported."""
    off = build_engine(max_batch=2, expert_memory="40%")
    tok = engine.tokenizer
    texts = {}
    for e in (engine, off):
        for i, p in enumerate(["The cat", "def f(x):", "Hello"]):
            e.submit(Request(tok(p).input_ids, 6, lambda ev, e=e, i=i: texts.__setitem__((id(e), i), ev), id=str(i)))
        e.run_until_idle()
    assert all(texts[(id(engine), i)]["text"] == texts[(id(off), i)]["text"] for i in range(3))
    assert 0 <= off.metrics()["cache_hit_rate"] < 1 and engine.metrics()["cache_hit_rate"] is None


def test_queue_limit_and_context(engine):
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit(Request([1, 2], engine.context, print))
    with pytest.raises(RequestError, match="prompt has"):
        engine.submit(Request(list(range(engine.context)), 1, print))
    reqs = [Request([5, 6], 1, print) for _ in range(engine.max_queue)]
    for r in reqs:
        engine.submit(r)
    with pytest.raises(QueueFull, match="queue holds 8"):
        engine.submit(Request([5, 6], 1, print))
    engine.run_until_idle()


def test_choose_ready_is_expert_aware_with_bounded_wait():
    running = [{1, 2}, {2, 3}]
    ready = [{7, 8}, {1, 3}, {2, 9}]
    assert choose_ready(running, ready, [0, 0, 0], 1, 4) == [1]  # adds no expert
    assert choose_ready(running, ready, [0, 0, 0], 2, 4) == [1, 2]
    assert choose_ready(running, ready, [4, 0, 0], 1, 4) == [0]  # waited max_wait: taken first
    assert choose_ready(running, ready, [0, 1, 0], 1, 4, pick_first_come) == [1]  # longest wait
    assert choose_ready(running, ready, [0, 0, 0], 3, 4) == [0, 1, 2]  # all fit


@pytest.mark.parametrize(("args", "msg"), [(["--max-batch", "0"], "--max-batch 0"), (["--port", "0"], "--port 0"),
                                           (["--max-queue", "0"], "--max-queue 0")])
def test_serve_cli_bad_options(args, msg, capsys):
    from moekit.cli.main import main

    assert main(["serve", *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("moekit serve: error: ") and msg in last


def test_serve_cli_refuses_a_port_in_use(capsys):
    import socket

    from moekit.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--port {port}: cannot bind 127.0.0.1:{port}" in last


@pytest.mark.slow
def test_serve_cli_answers_on_localhost():
    import os
    import subprocess
    import sys
    import time

    import httpx

    from moekit.serve.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli.main", "serve", "--port", str(port), "--max-batch", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                               json={"model": "moekit-tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_predicted_experts_follow_the_token(engine):
    """A row's next experts are guessed from where its next input token was last routed (pre-gating)."""
    from moekit.serve.engine import _Seq

    ids = engine.tokenizer("The cat sat on the mat").input_ids
    engine.submit(Request(ids, 2, print))
    engine.run_until_idle()
    k = engine.model.config.num_experts_per_tok
    assert all(len(engine._by_token[t]) == len(engine.layers) * k for t in ids)  # k experts in each layer
    seq = _Seq(Request(ids, 1, print), None, tokens=[ids[2]], experts={999})
    assert engine.predicted(seq) == engine._by_token[ids[2]]
    assert engine.predicted(_Seq(Request(ids, 1, print), None, tokens=[-5], experts={999})) == {999}
