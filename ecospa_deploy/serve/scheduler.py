"""Dynamic batching: one worker thread owns the backend and runs admit → step forever.

Each iteration first frees the slots of cancelled sequences, then prefills waiting sequences
into free slots (``prefill_order`` "shortest", the default: shortest prompt first among all
not yet started, a prompt passed over ``MAX_PASSED_OVER`` times first; "arrival": first come
first served; together in one
``backend.add_many`` where the backend has it, else one ``backend.add`` each), then decodes one
token for every occupied slot (``backend.step``; with a backend that has ``launch`` and
``collect``, the engine, step N+1 is launched before step N's tokens are handled, so the device
never waits for this thread's per-token work). A request that arrives while a
batch decodes therefore joins it at the next step; nothing is serialised per request.

With ``prefill_chunk`` (and a backend with ``add_chunk``, the engine) at most that many prompt
tokens are prefilled between two decode steps: whole prompts while they fit (a prompt that
does not fit what is left of the step waits for the next one), and a prompt longer than a
step's budget a chunk at a time (chunked prefill), so running streams pause for one budget's
worth of prefill, never for a whole long prompt.
While streams run, the chunk also shrinks to what the measured prefill rate does in
``max_pause`` seconds (a CPU prefills a few hundred tokens a second; a chunk's attention grows
with the prompt cached before it), at least ``MIN_CHUNK`` tokens; the rate is measured on
prefills of at least ``MEASURE_MIN`` tokens (a GPU spends ~5 ms on any small one, and a rate
read off those shrank the chunk to a few hundred tokens on the H200: 1024-token prompts were
then prefilled eagerly in pieces, TTFT p50 405 ms against 227 ms). The server uses the
adaptive chunk on CPU only. Admitted sequences hold
their slot while they wait for their turn. Tokens go
back to the asyncio side through ``loop.call_soon_threadsafe``; the model never runs on the
event loop, so the HTTP side stays responsive while it computes.

The waiting queue is bounded (``QueueFull`` → HTTP 429; a request with more sequences than
the whole queue holds can never fit: ``NeverFits`` → HTTP 400). A failing ``add`` fails only its
sequence; a failing ``step`` fails the sequences of that batch. The worker never dies of
a request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence as Seq

from ecospa_deploy.serve.backend import SlotBackend
from ecospa_deploy.serve.metrics import Metrics

if TYPE_CHECKING:      # torch-free at import: `ecospa serve --help` reads PREFILL_ORDERS
    from ecospa_deploy.engine.sampling import SamplingParams

log = logging.getLogger("ecospa_deploy.serve")


MIN_CHUNK = 16
MEASURE_MIN = 128      # prefill calls shorter than this do not inform the rate
# With prefill_order "shortest", a prompt passed over by this many prefill steps goes first
# (in arrival order), so a stream of short prompts cannot starve a long one.
MAX_PASSED_OVER = 4
PREFILL_ORDERS = ("shortest", "arrival")


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``."""


class NeverFits(Exception):
    """The request has more sequences than ``max_queue``: retrying can never help."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass(frozen=True)
class TokenEvent:
    """What a sequence receives: a token, or the end (``finish`` "stop"/"length"/"error"/
    "cancelled"/"shutdown": the server stopped before the sequence could finish)."""

    token: int | None = None
    finish: str | None = None
    error: str | None = None


class Sequence:
    """One generated choice: prompt ids in; ``TokenEvent``s out through ``sink`` (any thread)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams,
                 sink: Callable[[TokenEvent], None]) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.generated = 0
        self.cancelled = False
        self.done = False
        self._scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop generating (client gone, stop string seen, timeout); the slot is freed soon.
        A sequence that already ended has no slot: nothing to wake (every request's cleanup
        cancels its sequences, and a wake-up per request costs the worker a GIL hand-off, the
        engine core a pipe message)."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            if self._scheduler is not None:
                self._scheduler.on_cancel(self)


class AsyncioSink:
    """A sink that puts ``(tag, event)`` on an asyncio queue from the worker thread. The
    scheduler batches these: the events of one step reach each loop in one wake-up."""

    __slots__ = ("loop", "queue", "tag")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, tag: object):
        self.loop, self.queue, self.tag = loop, queue, tag

    def __call__(self, event: TokenEvent) -> None:
        _send_threadsafe(self.loop, [(self.queue, (self.tag, event))])


def asyncio_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 tag: object) -> AsyncioSink:
    return AsyncioSink(loop, queue, tag)


def check_admission(stopping: bool, waiting: int, count: int, max_queue: int) -> None:
    """Raise why ``count`` more sequences cannot queue behind ``waiting`` ones, if they cannot."""
    if stopping:
        raise ShuttingDown("the server is shutting down")
    if count > max_queue:
        raise NeverFits(f"this request needs {count} sequences (prompts x n) and the queue "
                        f"holds at most {max_queue} (--max-queue); send fewer prompts or a "
                        "smaller n")
    if waiting + count > max_queue:
        raise QueueFull(f"{waiting} sequences are waiting and the queue holds at most "
                        f"{max_queue} (--max-queue); retry later")


class Outbox:
    """Events bound for asyncio sinks, held until ``flush``: one ``call_soon_threadsafe`` per
    event loop for everything emitted since the last flush; other sinks are called at once."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list] = {}

    def add(self, sink: Callable[[TokenEvent], None], event: TokenEvent) -> None:
        if isinstance(sink, AsyncioSink):
            self._items.setdefault(sink.loop, []).append((sink.queue, (sink.tag, event)))
        else:
            sink(event)

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            _send_threadsafe(loop, batch)


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _send_threadsafe(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # loop closed: the requests are gone
        pass


class Scheduler:
    """Owns the backend's slots; see the module docstring."""

    def __init__(self, backend: SlotBackend, max_batch_size: int, max_queue: int,
                 metrics: Metrics | None = None, prefill_chunk: int | None = None,
                 max_pause: float | None = 0.25, decode_steps: int = 1,
                 async_decode: bool = True, prefill_order: str = "shortest") -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_queue={max_queue}; "
                             "expected both >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}; expected >= 1 or None (whole "
                             "prompts)")
        self.backend = backend
        # chunked prefill only where the backend can continue a prompt
        self.prefill_chunk = prefill_chunk if hasattr(backend, "add_chunk") else None
        # [seq, slot, tokens cached, prefill steps passed over], in turn
        self._prefilling: deque[list] = deque()
        if prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"prefill_order={prefill_order!r}; expected one of "
                             f"{', '.join(PREFILL_ORDERS)}")
        self.prefill_order = prefill_order
        self.max_pause = max_pause
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps!r}; expected an int >= 1")
        # several steps per host sync while nothing waits (a backend with ``steps``)
        self.decode_steps = decode_steps if hasattr(backend, "steps") else 1
        # Launch step N+1 before handling step N's tokens (a backend with launch/collect): the
        # device runs while this thread fans tokens out, waits for the GIL, prefills.
        self.async_decode = bool(async_decode) and hasattr(backend, "launch") and \
            hasattr(backend, "collect")
        self._inflight = None
        self._outbox = Outbox()
        self._prefill_rate: float | None = None     # prompt tokens/s, smoothed
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._pending: deque[Sequence] = deque()
        self._active: dict[int, Sequence] = {}
        self._free = list(range(max_batch_size - 1, -1, -1))
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- called from the event loop ----------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of a request's sequences, or none (``QueueFull``/``ShuttingDown``)."""
        error = self.submit_many([seqs])[0]
        if error is not None:
            raise error

    def submit_many(self, requests: list[list[Sequence]]) -> list[Exception | None]:
        """Queue several requests, each all or none, under one lock and with one wake-up, so
        the worker admits them in one shortest-first prefill rather than starting on the first
        while the rest queue behind it. Returns, per request, ``None`` or why it was refused
        (``QueueFull``/``NeverFits``/``ShuttingDown``)."""
        errors: list[Exception | None] = []
        with self._cond:
            for seqs in requests:
                try:
                    check_admission(self._stopping or not self.alive, len(self._pending),
                                    len(seqs), self.max_queue)
                except (QueueFull, NeverFits, ShuttingDown) as exc:
                    errors.append(exc)
                    continue
                for seq in seqs:
                    seq._scheduler = self
                    self._pending.append(seq)
                errors.append(None)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return errors

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def on_cancel(self, seq: Sequence) -> None:
        """``seq.cancel()`` was called: the worker frees its slot at the next iteration."""
        self.wake()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="ecospa-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def busy(self) -> int:
        """Sequences waiting, prefilling or decoding."""
        return len(self._pending) + len(self._prefilling) + len(self._active)

    def abort(self) -> None:
        """Refuse new work and end every sequence (finish "shutdown") after the current step;
        does not wait, so the event loop may call it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """``abort``, then join the worker."""
        self.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._active
                               or self._prefilling):
                        self._cond.wait()
                    if self._stopping:
                        break
                    admit = []
                    while self._pending and len(self._free) > len(admit):
                        seq = self._pending.popleft()
                        if seq.cancelled:
                            self._finish(seq, "cancelled")
                        else:
                            admit.append(seq)
                    self.metrics.queue_depth.set(len(self._pending))
                self._reap_cancelled()
                if self.prefill_chunk is None:
                    if self.prefill_order == "shortest":   # each admitted batch is prefilled whole
                        admit.sort(key=lambda q: len(q.prompt_ids))
                    self._admit_many([(seq, self._free.pop()) for seq in admit])
                else:
                    self._prefilling.extend([seq, self._free.pop(), 0, 0] for seq in admit)
                    if admit and self.prefill_order == "shortest":
                        self._shortest_first()
                    self._prefill_some(self._budget())
                self._flush()
                if self._active:
                    self._step()
                    self._flush()
                if not self._active and self._inflight is not None:
                    self._drain()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            leftovers = list(self._pending) + [p[0] for p in self._prefilling] + \
                list(self._active.values())
            self._pending.clear()
        while self._prefilling:
            self._unreserve(self._prefilling.popleft()[1])
        for slot in list(self._active):
            self._release(slot)
        for seq in leftovers:
            self._finish(seq, "shutdown", "the server is shutting down")
        self._flush()
        self.metrics.queue_depth.set(0)

    def _reap_cancelled(self) -> None:
        for slot, seq in list(self._active.items()):
            if seq.cancelled:
                self._release(slot)
                self._finish(seq, "cancelled")
        for item in [p for p in self._prefilling if p[0].cancelled]:
            self._prefilling.remove(item)
            self._unreserve(item[1])
            self._finish(item[0], "cancelled")

    def _shortest_first(self) -> None:
        """Order the prompts waiting for their prefill: a burst's TTFTs are prefix sums of its
        prefills, and shortest first minimises every percentile of them (the floor
        ``benchmark.floor.burst_ttft_floor_s`` assumes). Over every prompt not yet started,
        not only those admitted together: a burst reaches the scheduler over HTTP in pieces.
        A prompt already partly cached keeps its turn; one passed over ``MAX_PASSED_OVER``
        times goes ahead of the shorter ones, oldest first."""
        def key(item):
            seq, _, done, passed = item
            if done:
                return (0, 0)
            if passed >= MAX_PASSED_OVER:
                return (1, 0)                    # stable: arrival order among these
            return (2, len(seq.prompt_ids))
        self._prefilling = deque(sorted(self._prefilling, key=key))

    def _budget(self) -> int:
        """Prompt tokens to prefill before the next decode step."""
        budget = self.prefill_chunk
        if self._active and self.max_pause and self._prefill_rate:
            budget = min(budget, max(MIN_CHUNK, int(self.max_pause * self._prefill_rate)))
        return budget

    def _prefill_some(self, budget: int) -> None:
        """Prefill up to ``budget`` prompt tokens of the sequences in turn. Whole prompts that
        fit go together through ``add_many`` (one batched prefill, one host sync) where the
        backend has it; a prompt that does not fit what is left waits for the next step if a
        whole step's budget would hold it (cutting it would run its pieces on the slower
        chunked path); only a prompt longer than a whole step's budget is cut, a chunk at a
        time through ``add_chunk``."""
        full, whole = budget, []
        while self._prefilling and budget > 0:
            item = self._prefilling[0]
            seq, slot, done, _ = item
            left = len(seq.prompt_ids) - done
            if done == 0 and left <= budget:
                whole.append(self._prefilling.popleft())
                budget -= left
                continue
            if left <= full and budget < full:
                break                                   # whole, at the next step
            n = min(left, budget)
            budget -= n
            start = time.perf_counter()
            try:
                token = self.backend.add_chunk(slot, seq.prompt_ids, seq.params, done + n)
                self._measure(n, time.perf_counter() - start)
            except Exception as exc:  # a bad request must not take the worker down
                log.exception("prefill failed for sequence %d", seq.id)
                self._prefilling.popleft()
                self._unreserve(slot)
                self._finish(seq, "error", f"prefill failed: {type(exc).__name__}: {exc}")
                continue
            item[2] = done + n
            if token is not None:
                self._prefilling.popleft()
                self._activate(slot, seq, token)
        for item in self._prefilling:                  # still waiting: passed over once more
            if item[2] == 0:
                item[3] += 1
        if whole:
            start = time.perf_counter()
            self._admit_many([(seq, slot) for seq, slot, _, _ in whole])
            self._measure(sum(len(seq.prompt_ids) for seq, _, _, _ in whole),
                          time.perf_counter() - start)

    def _measure(self, tokens: int, seconds: float) -> None:
        if tokens < MEASURE_MIN:   # a short prompt's time is fixed overhead, not its tokens
            return
        rate = tokens / max(seconds, 1e-6)
        self._prefill_rate = rate if self._prefill_rate is None else \
            0.5 * (self._prefill_rate + rate)

    def _unreserve(self, slot: int) -> None:
        try:
            self.backend.free(slot)
        except Exception:
            log.exception("freeing slot %d failed", slot)
        self._free.append(slot)

    def _admit(self, seq: Sequence, slot: int | None = None) -> None:
        slot = self._free.pop() if slot is None else slot
        try:
            token = self.backend.add(slot, seq.prompt_ids, seq.params)
            self.metrics.prefill_batch_size.observe(1)
        except Exception as exc:  # a bad request must not take the worker down
            log.exception("prefill failed for sequence %d", seq.id)
            self._free.append(slot)
            self._finish(seq, "error", f"prefill failed: {type(exc).__name__}: {exc}")
            return
        self._activate(slot, seq, token)

    def _admit_many(self, items: list[tuple[Sequence, int]]) -> None:
        """Prefill ``(sequence, reserved slot)`` pairs together where the backend can
        (``add_many``); if that fails, each alone, so a bad request fails only itself."""
        add_many = getattr(self.backend, "add_many", None)
        if add_many is not None and len(items) > 1:
            try:
                tokens = add_many([slot for _, slot in items],
                                  [seq.prompt_ids for seq, _ in items],
                                  [seq.params for seq, _ in items])
            except Exception:
                log.warning("batched prefill of %d sequences failed; prefilling each alone",
                            len(items), exc_info=True)
            else:
                self.metrics.prefill_batch_size.observe(len(items))
                for (seq, slot), token in zip(items, tokens):
                    self._activate(slot, seq, token)
                return
        for seq, slot in items:
            self._admit(seq, slot)

    def _activate(self, slot: int, seq: Sequence, token: int) -> None:
        self._active[slot] = seq
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self.metrics.running.set(len(self._active))
        self.metrics.generation_tokens.inc()
        self._emit(slot, seq, token)

    def _step(self) -> None:
        batch = dict(self._active)
        n = 1
        if self.decode_steps > 1 and not self._pending and not self._prefilling:
            left = min(q.params.max_new_tokens - q.generated for q in batch.values())
            n = max(1, min(self.decode_steps, left))
        for _ in range(n):
            self.metrics.batch_size.observe(len(batch))
        self.steps += n
        try:
            if self.async_decode:
                launched = self.backend.launch(n)
                tokens = self._collect()
                self._inflight = launched
            else:
                tokens = self.backend.steps(n) if n > 1 else \
                    {s: [t] for s, t in self.backend.step().items()}
        except Exception as exc:
            self._inflight = None
            log.exception("decode step failed for %d sequences", len(batch))
            for slot, seq in batch.items():
                self._release(slot)
                self._finish(seq, "error", f"decode failed: {type(exc).__name__}: {exc}")
            return
        self._deliver(tokens)

    def _collect(self) -> dict[int, list[int]]:
        """The tokens of the steps in flight (``async_decode``), if any."""
        launched, self._inflight = self._inflight, None
        return self.backend.collect(launched) if launched is not None else {}

    def _drain(self) -> None:
        """Every sequence ended with steps in flight: wait for them, nothing takes their
        tokens (the backend parks the rows they advanced)."""
        try:
            self._collect()
        except Exception:
            log.exception("collecting the last decode step failed")

    def _deliver(self, tokens: dict[int, list[int]]) -> None:
        emitted = 0
        for slot, toks in tokens.items():
            for token in toks:
                seq = self._active.get(slot)
                if seq is not None:
                    self._emit(slot, seq, token)
                    emitted += 1
        if emitted:
            # one counter update a step, not one a token: each takes the metric's lock (and in
            # the engine core, a recorded op that crosses the pipe)
            self.metrics.generation_tokens.inc(emitted)

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        """Deliver ``event``: held until ``_flush`` for asyncio sinks."""
        self._outbox.add(seq.sink, event)

    def _flush(self) -> None:
        """One wake-up per event loop for everything emitted since the last flush."""
        self._outbox.flush()

    def _emit(self, slot: int, seq: Sequence, token: int) -> None:
        now = time.monotonic()
        seq.generated += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        self._send(seq, TokenEvent(token=token))
        if token in seq.params.stop_token_ids:
            finish = "stop"
        elif seq.generated >= seq.params.max_new_tokens:
            finish = "length"
        else:
            return
        self._release(slot)
        self._finish(seq, finish)

    def _release(self, slot: int) -> None:
        if self._active.pop(slot, None) is None:
            return
        self._unreserve(slot)
        self.metrics.running.set(len(self._active))

    def _finish(self, seq: Sequence, finish: str, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        now = time.monotonic()
        if finish in ("stop", "length"):
            self.metrics.e2e.observe(now - seq.arrival)
            if seq.generated > 1 and seq.first_token_at is not None:
                self.metrics.tpot.observe((now - seq.first_token_at) / (seq.generated - 1))
        self._send(seq, TokenEvent(finish=finish, error=error))
