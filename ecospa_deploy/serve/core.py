"""The engine core in its own process, so the decode loop never waits for the HTTP side's GIL.

With ``--engine-process`` the server runs as two processes, as vLLM's V1 does: the API process
(uvicorn: HTTP, tokenizing, detokenizing, SSE) and the engine core (the model, the backend and
the ``Scheduler`` loop). In one process the scheduler thread and the event loop take turns on
one GIL, and every decode step can wait for a slice of HTTP work; here neither waits for the
other. They talk over one duplex pipe of pickled tuples:

- API → core: ``("submit", [(id, prompt_ids, params, arrival), ...])``, ``("cancel", id)``,
  ``("abort",)``, ``("stop",)``;
- core → API: ``("ready", info)`` once the model is loaded and warmed up, or ``("fatal",
  exception)``; then per scheduler flush (a prefill batch, a decode step) ``("events",
  [(id, token, finish, error), ...], metric_ops)``; ``("exit",)`` last.

The core is spawned (CUDA cannot be forked) and exits when the pipe closes, so a killed API
process does not leave a GPU process behind; a core that dies fails every running sequence
with an error and turns ``/health`` to 503. ``arrival`` is ``time.monotonic()`` of the API
process, the same clock in both on Linux, so TTFT counts the time before the core saw the
request. Admission limits (``--max-queue``) are checked in the API process, where a request
can still be answered 429: a sequence counts as waiting until its first event arrives.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ecospa_deploy.serve import gc_heap
from ecospa_deploy.serve.metrics import Metrics
from ecospa_deploy.serve.scheduler import (Outbox, Scheduler, Sequence, ShuttingDown,
                                           TokenEvent, check_admission)

log = logging.getLogger("ecospa_deploy.serve")

# the scheduler's metric calls, recorded in the core and replayed on the API's Metrics
_METRICS = ("prompt_tokens", "generation_tokens", "ttft", "tpot", "e2e", "queue_depth",
            "running", "batch_size", "prefill_batch_size")


@dataclass(frozen=True)
class CoreConfig:
    """What it takes to load and serve the model (picklable: it crosses the spawn); the
    one-process server starts from it too (``server.start_scheduler``)."""

    path: str
    backend: str
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_model_len: int | None = None
    max_queue: int = 256
    prefill_chunk: int | None = None
    decode_steps: int = 1
    async_decode: bool = True
    compile: bool = True
    packed_prefill: bool = True
    compile_prefill: bool = True
    prefill_order: str = "shortest"
    gil_switch_ms: float = 0.5
    log_level: str = "info"


class _Recorder:
    __slots__ = ("name", "ops")

    def __init__(self, name: str, ops: list) -> None:
        self.name, self.ops = name, ops

    def inc(self, value: float = 1) -> None:
        self.ops.append((self.name, "inc", value))

    def set(self, value: float) -> None:
        self.ops.append((self.name, "set", value))

    def observe(self, value: float) -> None:
        self.ops.append((self.name, "observe", value))


class RecordingMetrics:
    """The scheduler's ``Metrics`` surface in the core: calls are recorded, not counted, and
    ``take`` hands them over (counter increments summed, each gauge's last value) to be
    replayed on the API process's real ``Metrics`` by ``replay``."""

    def __init__(self) -> None:
        self._ops: list = []
        self._lock = threading.Lock()
        for name in _METRICS:
            setattr(self, name, _Recorder(name, self._ops))

    def take(self) -> list:
        with self._lock:      # appends from other threads may land meanwhile: keep them
            n = len(self._ops)
            ops = self._ops[:n]
            del self._ops[:n]
        incs: dict[str, float] = {}
        sets: dict[str, float] = {}
        out = []
        for name, method, value in ops:
            if method == "inc":
                incs[name] = incs.get(name, 0) + value
            elif method == "set":
                sets[name] = value
            else:
                out.append((name, method, value))
        return out + [(n, "inc", v) for n, v in incs.items()] + \
            [(n, "set", v) for n, v in sets.items()]


def replay(metrics: Metrics, ops: list) -> None:
    for name, method, value in ops:
        if name in _METRICS:
            getattr(getattr(metrics, name), method)(value)


class _CoreScheduler(Scheduler):
    """The scheduler of the core: events go to the pipe, one message per flush."""

    def __init__(self, send, *args, **kwargs) -> None:
        super().__init__(*args, metrics=RecordingMetrics(), **kwargs)
        self._send_msg = send
        self._events: list[tuple] = []
        self.seqs: dict[int, Sequence] = {}

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        self._events.append((seq.id, event.token, event.finish, event.error))
        if event.finish is not None:
            self.seqs.pop(seq.id, None)

    def _flush(self) -> None:
        events, self._events = self._events, []
        ops = self.metrics.take()
        if events or ops:
            self._send_msg(("events", events, ops))


def _ignore(*_: Any) -> None:
    return None


def run_core(conn, config: CoreConfig) -> None:
    """The core process's main: load, warm up, report ``ready``, then serve the pipe until
    ``stop`` or until the API process is gone."""
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        with lock:
            try:
                conn.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                pass    # the API process is gone; the reader below sees EOF and stops

    try:
        scheduler, info = _load(config, send)
    except BaseException as exc:  # the API process re-raises it as the server's start error
        try:
            send(("fatal", exc))
        except Exception:
            send(("fatal", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    send(("ready", info))
    try:
        _serve_pipe(conn, scheduler, send)
    finally:
        scheduler.stop()
        gc_heap.report()
        send(("exit",))
        conn.close()


def _load(config: CoreConfig, send) -> tuple[_CoreScheduler, dict]:
    from ecospa_deploy.serve.server import start_scheduler

    scheduler, info = start_scheduler(config, functools.partial(_CoreScheduler, send))
    sys.setswitchinterval(config.gil_switch_ms / 1e3)
    gc_heap.settle()
    return scheduler, info


# at most this many buffered messages are taken per wake-up (a bound on the reader's latency)
_DRAIN = 1024


def _serve_pipe(conn, scheduler: _CoreScheduler, send) -> None:
    """Serve the pipe until ``stop`` or EOF. Each wake-up takes every message already waiting
    and hands consecutive submissions to the scheduler together (``submit_many``): a burst that
    reached the pipe while the core was busy is admitted as one shortest-first prefill, as in
    one process, instead of the first arrival alone with the rest a step later."""
    while True:
        try:
            msgs = [conn.recv()]
            while len(msgs) < _DRAIN and conn.poll(0):
                msgs.append(conn.recv())
        except (EOFError, OSError):
            log.warning("the API process is gone; stopping the engine core")
            return
        submits: list[list[tuple]] = []
        for msg in msgs:
            if msg[0] == "submit":
                submits.append(msg[1])
                continue
            _submit(scheduler, submits, send)   # in order: a cancel follows its submit
            submits = []
            if msg[0] == "cancel":
                seq = scheduler.seqs.get(msg[1])
                if seq is not None:
                    seq.cancel()
            elif msg[0] == "abort":
                scheduler.abort()
            elif msg[0] == "stop":
                return
        _submit(scheduler, submits, send)


def _submit(scheduler: _CoreScheduler, requests: list[list[tuple]], send) -> None:
    if not requests:
        return
    groups = []
    for items in requests:
        seqs = []
        for sid, prompt_ids, params, arrival in items:
            seq = Sequence(prompt_ids, params, _ignore)
            seq.id, seq.arrival = sid, arrival
            scheduler.seqs[sid] = seq
            seqs.append(seq)
        groups.append(seqs)
    refused = []
    for seqs, exc in zip(groups, scheduler.submit_many(groups)):
        if exc is None:
            continue
        finish = "shutdown" if isinstance(exc, ShuttingDown) else "error"
        for seq in seqs:
            scheduler.seqs.pop(seq.id, None)
            refused.append((seq.id, None, finish, str(exc)))
    if refused:
        send(("events", refused, []))


class EngineCoreClient:
    """The API process's side: the ``Scheduler`` surface the HTTP service uses (``submit``,
    ``alive``, ``busy``, ``queued``, ``abort``, ``stop``, ``max_queue``), backed by the core
    process. ``start`` blocks until the model is loaded (or raises the core's error)."""

    def __init__(self, config: CoreConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.max_queue = config.max_queue
        self.max_batch_size = config.max_batch_size
        self.metrics = metrics or Metrics()
        self.info: dict = {}
        self._seqs: dict[int, Sequence] = {}
        self._waiting: set[int] = set()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stopping = False
        self._conn = None
        self._proc = None
        self._reader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> "EngineCoreClient":
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_core, args=(theirs, self.config),
                                 name="ecospa-engine-core", daemon=True)
        self._proc.start()
        theirs.close()
        self._conn = ours
        try:
            msg = self._wait_ready(timeout)
        except BaseException:
            self._kill()
            raise
        if msg[0] == "fatal":
            self._proc.join(10)
            raise msg[1]
        self.info = msg[1]
        self._reader = threading.Thread(target=self._read, name="ecospa-core-reader",
                                        daemon=True)
        self._reader.start()
        return self

    def _wait_ready(self, timeout: float | None) -> tuple:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine core process exited with code "
                                   f"{self._proc.exitcode} before it was ready")
            if timeout is not None and waited >= timeout:
                raise RuntimeError(f"the engine core was not ready after {timeout:g} s")
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.join(10)
            raise RuntimeError(f"the engine core process exited with code "
                               f"{self._proc.exitcode} before it was ready") from None

    @property
    def alive(self) -> bool:
        return (self._proc is not None and self._proc.is_alive() and self._reader is not None
                and self._reader.is_alive())

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return len(self._seqs)

    def abort(self) -> None:
        """Refuse new work; the core ends every sequence (finish "shutdown")."""
        self._stopping = True
        self._send(("abort",))

    def stop(self, timeout: float = 10.0) -> None:
        """End every sequence, stop the core, wait for it (then kill it)."""
        self._stopping = True
        self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        self._kill(timeout)

    def _kill(self, timeout: float = 5.0) -> None:
        if self._proc is None:
            return
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine core did not stop within %g s; killing it", timeout)
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()

    # -- requests (event loop) --------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of a request's sequences, or none (``QueueFull``/``NeverFits``/
        ``ShuttingDown``), as ``Scheduler.submit``."""
        with self._lock:
            check_admission(self._stopping or not self.alive, len(self._waiting), len(seqs),
                            self.max_queue)
            for seq in seqs:
                seq._scheduler = self
                self._seqs[seq.id] = seq
                self._waiting.add(seq.id)
        self._send(("submit", [(seq.id, seq.prompt_ids, seq.params, seq.arrival)
                               for seq in seqs]))

    def on_cancel(self, seq: Sequence) -> None:
        self._send(("cancel", seq.id))

    def wake(self) -> None:
        return None

    def _send(self, msg: tuple) -> None:
        if self._conn is None:
            return
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                pass     # the core is gone: the reader fails the running sequences

    # -- the reader thread ------------------------------------------------------------------
    def _read(self) -> None:
        reason = "the engine core stopped"
        try:
            while True:
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    self._proc.join(5)
                    reason = f"the engine core process exited (code {self._proc.exitcode})"
                    log.error("%s with %d sequences running", reason, len(self._seqs))
                    break
                if msg[0] == "events":
                    self._deliver(msg[1])
                    replay(self.metrics, msg[2])
                elif msg[0] == "exit":
                    break
        finally:
            self._fail_all(reason)

    def _deliver(self, events: list[tuple]) -> None:
        outbox = Outbox()
        with self._lock:
            for sid, token, finish, error in events:
                seq = self._seqs.get(sid)
                if seq is None:
                    continue
                self._waiting.discard(sid)
                if finish is not None:
                    del self._seqs[sid]
                    seq.done = True
                outbox.add(seq.sink, TokenEvent(token, finish, error))
        outbox.flush()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            seqs, self._seqs = list(self._seqs.values()), {}
            self._waiting.clear()
        outbox = Outbox()
        for seq in seqs:
            seq.done = True
            outbox.add(seq.sink, TokenEvent(finish="shutdown" if self._stopping else "error",
                                            error=reason))
        outbox.flush()
