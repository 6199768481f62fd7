"""A scripted slot backend and an in-thread uvicorn server around it: the HTTP layer under test
with no model (fast, deterministic). Shared by the hardening and fuzz tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from ecospa_deploy.serve.app import create_app
from ecospa_deploy.serve.connections import guarded_h11
from ecospa_deploy.serve.generation import GenerationService
from ecospa_deploy.serve.metrics import Metrics
from ecospa_deploy.serve.scheduler import Scheduler
from ecospa_deploy.testing import tiny_tokenizer

KEY = "fake-key"


class EchoBackend:
    """Slot protocol; token = 10 + tokens generated so far, after ``delay`` seconds a step."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.slots: dict[int, int] = {}

    def add(self, slot, prompt_ids, params):
        self.slots[slot] = 0
        return 10

    def step(self):
        time.sleep(self.delay)
        for slot in self.slots:
            self.slots[slot] += 1
        return {slot: 10 + n % 50 for slot, n in self.slots.items()}

    def free(self, slot):
        self.slots.pop(slot, None)


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
    metrics = Metrics()
    sched = Scheduler(EchoBackend(delay), batch, max_queue, metrics).start()
    service = GenerationService(sched, tokenizer(), "fake", max_model_len, vocab_size=96,
                                eos_token_ids=(2,), request_timeout=timeout)
    return create_app(service, metrics, api_key=api_key, max_body_bytes=1 << 20), sched, service


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
