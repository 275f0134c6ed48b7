"""Building and running `moekit serve`: the model and engine from command-line options, and uvicorn in the calling
thread (`serve`) or a background thread (`ServerThread`, for tests and `moekit bench serve`)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from moekit.serve.engine import Engine, RequestError

DEFAULT_MODEL_ID = "moekit-tiny"


def model_id_of(model_path: str | os.PathLike | None) -> str:
    return DEFAULT_MODEL_ID if model_path is None else Path(model_path).resolve().name


def build_engine(model_path: str | os.PathLike | None = None, *, dtype: str = "fp32", expert_memory: str | None = None,
                 max_batch: int = 8, max_queue: int = 64, max_wait: int = 8, scheduler: str = "expert",
                 max_running: int | None = None) -> Engine:
    """The engine for the model at `model_path` (None: moekit-tiny); with `expert_memory`, its routed experts are
    read on demand through moekit.runtime.offload under that budget ('2GB', '25%', bytes)."""
    from moekit.runtime.decode import DTYPES, load_for_decode

    if max_batch < 1:
        raise RequestError(f"--max-batch {max_batch}: expected at least 1")
    if max_queue < 1:
        raise RequestError(f"--max-queue {max_queue}: expected at least 1")
    if max_running is not None and max_running < max_batch:
        raise RequestError(f"--max-running {max_running}: expected at least --max-batch {max_batch}")
    if max_wait < 0:
        raise RequestError(f"--max-wait {max_wait}: expected 0 or more")
    store = None
    if expert_memory is None:
        model, tokenizer = load_for_decode(None if model_path is None else str(model_path), dtype=dtype)
    else:
        from transformers import AutoTokenizer

        from moekit.default import default_model_path
        from moekit.runtime.offload import load_offloaded

        path = default_model_path() if model_path is None else Path(model_path)
        off = load_offloaded(path, expert_memory, dtype=DTYPES.get(dtype))
        model, store = off.model.eval(), off.store
        tokenizer = AutoTokenizer.from_pretrained(path)
    return Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_wait=max_wait,
                  scheduler=scheduler, store=store, max_running=max_running)


def check_bind(host: str, port: int) -> None:
    """Refuses (one line) a host that does not resolve or a port this process cannot bind there."""
    try:
        family = socket.getaddrinfo(host, port)[0][0]
    except OSError as err:
        raise RequestError(f"--host {host}: cannot be resolved ({err})") from None
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise RequestError(f"--port {port}: cannot bind {host}:{port} ({err.strerror}); expected a free port"
                               ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on host:port in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="moekit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
