"""A scripted slot backend and an in-thread uvicorn server around it: the HTTP layer under test
with no model (fast, deterministic). Shared by the hardening and fuzz tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from ecospa_deploy.serve.connections import guarded_h11
from ecospa_deploy.serve.echo import EchoBackend, echo_app
from ecospa_deploy.testing import tiny_tokenizer

KEY = "fake-key"


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = tiny_tokenizer()
        _TOKENIZER.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                    "{% endfor %}{% if add_generation_prompt %}assistant:"
                                    "{% endif %}")
    return _TOKENIZER


def fake_app(*, delay: float = 0.0, max_queue: int = 64, batch: int = 4, api_key=None,
             max_model_len: int = 64, timeout: float = 30.0):
    return echo_app(tokenizer(), EchoBackend(delay), batch=batch, max_queue=max_queue,
                    max_model_len=max_model_len, timeout=timeout, api_key=api_key)


@contextmanager
def live_server(*, read_timeout: float = 30.0, max_connections: int = 1000, **kw):
    """(url, scheduler) of a real uvicorn with our protocol in a thread, on a free port."""
    import uvicorn

    app, sched, service = fake_app(**kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            http=guarded_h11(read_timeout, max_connections))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > end:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sched
    finally:
        server.should_exit = True
        thread.join(10)
        sched.stop()
        service.close()
