"""A slot backend that computes nothing, and the server's app around it: the HTTP side alone.

The tests of the HTTP layer (tests/serve_fakes.py) and the host-cost benchmark
(bench/serve_host.py) both build the same stack: ``Scheduler`` → ``GenerationService`` →
``create_app`` over ``EchoBackend``.
"""

from __future__ import annotations

import time
from typing import Sequence


class EchoBackend:
    """Slot protocol; after ``delay`` seconds a step, each slot's token is ``ids[n % len]``
    for its n-th generated token (``ids`` default: 10..59). ``delay=None`` never sleeps, not
    even ``sleep(0)``, which hands the GIL over at every step: a step that costs nothing."""

    def __init__(self, delay: float | None = 0.0, ids: Sequence[int] | None = None) -> None:
        self.delay = delay
        self.ids = list(ids) if ids else list(range(10, 60))
        self.slots: dict[int, int] = {}

    def add(self, slot, prompt_ids, params):
        self.slots[slot] = 0
        return self.ids[0]

    def step(self):
        if self.delay is not None:
            time.sleep(self.delay)
        for slot in self.slots:
            self.slots[slot] += 1
        return {slot: self.ids[n % len(self.ids)] for slot, n in self.slots.items()}

    def free(self, slot):
        self.slots.pop(slot, None)


class AsyncEchoBackend(EchoBackend):
    """``EchoBackend`` with the engine's ``launch`` / ``collect``, so the scheduler decodes
    asynchronously over it as it does over the CUDA engine: launched steps run one after
    another on an emulated device, ``delay`` seconds each, while the host goes on; ``collect``
    sleeps (GIL released) until they are done, as the engine waits on its CUDA event. A slot
    freed or refilled since a launch gets none of that launch's tokens. ``waits_all``: collect
    waits for every step launched so far, the one launched ahead too, as a blocking copy to
    the device does (the engine's row parking did, every step, until ``engine.staging``)."""

    def __init__(self, delay: float, ids: Sequence[int] | None = None,
                 clock=time.monotonic, sleep=time.sleep, waits_all: bool = False) -> None:
        super().__init__(delay, ids)
        self._clock, self._sleep = clock, sleep
        self.waits_all = waits_all
        self._device_free = 0.0
        self._owner: dict[int, int] = {}      # slot -> the number of the sequence in it
        self._added = 0

    def add(self, slot, prompt_ids, params):
        self._added += 1
        self._owner[slot] = self._added
        return super().add(slot, prompt_ids, params)

    def launch(self, n: int = 1):
        if not self.slots:
            return None
        start = max(self._clock(), self._device_free)
        self._device_free = start + n * self.delay
        tokens = {}
        for slot in self.slots:
            first = self.slots[slot] + 1
            self.slots[slot] += n
            tokens[slot] = (self._owner[slot],
                            [self.ids[i % len(self.ids)] for i in range(first, first + n)])
        return self._device_free, tokens

    def collect(self, launched) -> dict[int, list[int]]:
        if launched is None:
            return {}
        done, tokens = launched
        if self.waits_all:
            done = self._device_free
        wait = done - self._clock()
        if wait > 0:
            self._sleep(wait)
        return {slot: toks for slot, (owner, toks) in tokens.items()
                if self._owner.get(slot) == owner}

    def free(self, slot):
        super().free(slot)
        self._owner.pop(slot, None)


def echo_app(tokenizer, backend: EchoBackend, *, batch: int, max_queue: int,
             max_model_len: int, timeout: float, api_key: str | None = None):
    """``(app, scheduler, service)`` of the server over ``backend`` (the scheduler started)."""
    from ecospa_deploy.serve.app import create_app
    from ecospa_deploy.serve.generation import GenerationService
    from ecospa_deploy.serve.metrics import Metrics
    from ecospa_deploy.serve.scheduler import Scheduler

    metrics = Metrics()
    sched = Scheduler(backend, batch, max_queue, metrics).start()
    service = GenerationService(sched, tokenizer, "fake", max_model_len,
                                vocab_size=len(tokenizer), eos_token_ids=(2,),
                                request_timeout=timeout)
    return create_app(service, metrics, api_key=api_key, max_body_bytes=1 << 20), sched, service
