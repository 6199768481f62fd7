"""Scheduler, detokenizer and app limits, with a scripted fake backend (no model, fast)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.serve.app import create_app
from ecospa_deploy.serve.detokenize import TextStream
from ecospa_deploy.serve.generation import GenerationService
from ecospa_deploy.serve.metrics import Metrics
from ecospa_deploy.serve.scheduler import (MAX_PASSED_OVER, QueueFull, Scheduler, Sequence,
                                          TokenEvent)
from ecospa_deploy.testing import tiny_tokenizer
from serve_fakes import wait_for


class FakeBackend:
    """Slot protocol; token = 10 + tokens generated so far; records every step's batch."""

    def __init__(self, delay: float = 0.0, fail_add: set[int] | None = None,
                 fail_step_once: bool = False) -> None:
        self.delay = delay
        self.fail_add = fail_add or set()
        self.fail_step_once = fail_step_once
        self.slots: dict[int, int] = {}
        self.batches: list[list[int]] = []
        self.freed: list[int] = []
        self.added: list[int] = []          # prompt length of each add, in order
        self.gate = threading.Event()
        self.gate.set()

    def add(self, slot, prompt_ids, params):
        if prompt_ids[0] in self.fail_add:
            raise RuntimeError("bad prompt")
        if slot in self.slots:
            raise AssertionError(f"slot {slot} reused before free")
        self.slots[slot] = 0
        self.added.append(len(prompt_ids))
        return 10

    def step(self):
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append(sorted(self.slots))
        if self.fail_step_once:
            self.fail_step_once = False
            raise RuntimeError("kernel exploded")
        out = {}
        for slot in self.slots:
            self.slots[slot] += 1
            out[slot] = 10 + self.slots[slot]
        return out

    def free(self, slot):
        self.freed.append(slot)
        del self.slots[slot]


def collect(seq_events: list) -> callable:
    return seq_events.append


def test_late_requests_join_the_running_batch():
    backend = FakeBackend(delay=0.01)
    sched = Scheduler(backend, max_batch_size=4, max_queue=8).start()
    try:
        events = [[] for _ in range(3)]
        first = Sequence([1], SamplingParams(max_new_tokens=20), events[0].append)
        sched.submit([first])
        wait_for(lambda: len(backend.batches) >= 3)  # the first request is decoding
        late = [Sequence([1], SamplingParams(max_new_tokens=5), events[i].append)
                for i in (1, 2)]
        sched.submit(late)
        wait_for(lambda: all(e and e[-1].finish for e in events))
        joined = [b for b in backend.batches if len(b) == 3]
        assert joined, backend.batches
        assert backend.batches.index(joined[0]) < 20  # joined mid-flight, not after
        assert [e.token for e in events[1][:-1]] == [10, 11, 12, 13, 14]
        assert events[1][-1] == TokenEvent(finish="length")
        assert len(events[0]) == 21 and events[0][-1].finish == "length"
        assert sorted(backend.freed) == [0, 1, 2]
        assert sched.metrics.batch_size._sum.get() >= 3 * len(joined)
    finally:
        sched.stop()


def test_cancelling_an_ended_sequence_wakes_nothing():
    class Recorder:
        def __init__(self):
            self.woken = []

        def on_cancel(self, seq):
            self.woken.append(seq.id)

    rec = Recorder()
    ended, running = (Sequence([1], SamplingParams(), lambda e: None) for _ in range(2))
    for seq in (ended, running):
        seq._scheduler = rec
    ended.done = True
    ended.cancel()
    running.cancel()
    running.cancel()
    assert rec.woken == [running.id] and running.cancelled


def test_a_burst_is_prefilled_shortest_prompt_first():
    """TTFTs of a burst are prefix sums of its prefills: shortest first minimises them."""
    backend = FakeBackend()
    sched = Scheduler(backend, max_batch_size=8, max_queue=8).start()
    try:
        events = [[] for _ in range(5)]
        lengths = [50, 1, 30, 7, 30]
        sched.submit([Sequence(list(range(3, 3 + n)), SamplingParams(max_new_tokens=2),
                               events[i].append) for i, n in enumerate(lengths)])
        wait_for(lambda: all(e and e[-1].finish for e in events))
        assert backend.added == [1, 7, 30, 30, 50]
        assert [len(e) for e in events] == [3] * 5       # every one still ran to its length
    finally:
        sched.stop()


class _StepByStep(FakeBackend):
    """Chunked-prefill capable; each decode step waits for the test to ``allow`` it."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = threading.Semaphore(0)

    def add_chunk(self, slot, prompt_ids, params, end):
        raise AssertionError("these prompts all fit a step's budget")

    def step(self):
        assert self.allowed.acquire(timeout=10), "the test never allowed this step"
        return super().step()


@contextlib.contextmanager
def _stepped(order: str):
    """``(backend, submit(*prompt lengths), step_then_added(count))`` over a running
    scheduler with 100 prompt tokens a step; every step is allowed and it stops on exit."""
    backend = _StepByStep()
    sched = Scheduler(backend, 16, 16, prefill_chunk=100, max_pause=None,
                      prefill_order=order).start()

    def submit(*lengths):
        sched.submit([Sequence([3] * n, SamplingParams(max_new_tokens=1000), lambda e: None)
                      for n in lengths])

    def step_then_added(count):
        backend.allowed.release()
        wait_for(lambda: len(backend.added) >= count)
        return backend.added[:]

    try:
        yield backend, submit, step_then_added
    finally:
        for _ in range(100):
            backend.allowed.release()
        sched.stop()


def test_shortest_first_spans_prompts_that_arrived_apart():
    """A burst reaches the scheduler in pieces: a short prompt that arrives while a longer
    one waits for the next step's budget goes ahead of it."""
    with _stepped("shortest") as (backend, submit, step_then_added):
        submit(80, 60)
        wait_for(lambda: backend.added == [60])        # 80 does not fit the 40 left
        submit(20, 10)
        assert step_then_added(3) == [60, 10, 20]       # 80 does not fit the 70 left
        assert step_then_added(4) == [60, 10, 20, 80]


def test_a_long_prompt_passed_over_four_times_goes_first():
    with _stepped("shortest") as (backend, submit, step_then_added):
        submit(80, 60)
        wait_for(lambda: backend.added == [60])
        for n in range(2, 2 + MAX_PASSED_OVER - 1):     # 50s keep coming, each shorter
            submit(50)
            assert step_then_added(n) == [60] + [50] * (n - 1)
        submit(50)
        assert step_then_added(5)[-1] == 80              # passed over four times: its turn
        assert step_then_added(6) == [60, 50, 50, 50, 80, 50]


def test_arrival_order_prefills_first_come_first_served():
    with _stepped("arrival") as (backend, submit, step_then_added):
        submit(80, 60)
        wait_for(lambda: backend.added == [80])        # 60 does not fit the 20 left
        submit(20, 10)
        assert step_then_added(4) == [80, 60, 20, 10]
    backend = FakeBackend()                              # whole prompts (no chunked prefill)
    sched = Scheduler(backend, 8, 8, prefill_order="arrival").start()
    try:
        events = [[] for _ in range(3)]
        sched.submit([Sequence([3] * n, SamplingParams(max_new_tokens=2), events[i].append)
                      for i, n in enumerate([50, 1, 30])])
        wait_for(lambda: all(e and e[-1].finish for e in events))
        assert backend.added == [50, 1, 30]
    finally:
        sched.stop()
    with pytest.raises(ValueError, match="prefill_order='longest'"):
        Scheduler(FakeBackend(), 8, 8, prefill_order="longest")


def test_stop_token_ends_sequence():
    backend = FakeBackend()
    sched = Scheduler(backend, 2, 4).start()
    try:
        events = []
        sched.submit([Sequence([1], SamplingParams(max_new_tokens=50, stop_token_ids=(13,)),
                               events.append)])
        wait_for(lambda: events and events[-1].finish)
        assert [e.token for e in events[:-1]] == [10, 11, 12, 13]
        assert events[-1].finish == "stop"
    finally:
        sched.stop()


def test_queue_is_bounded_and_cancel_frees_slot():
    backend = FakeBackend()
    backend.gate.clear()  # decoding blocks: slots stay taken
    sched = Scheduler(backend, max_batch_size=1, max_queue=2).start()
    try:
        running = Sequence([1], SamplingParams(max_new_tokens=100), lambda e: None)
        sched.submit([running])
        wait_for(lambda: backend.slots)
        waiting = [Sequence([1], SamplingParams(max_new_tokens=2), lambda e: None)
                   for _ in range(2)]
        sched.submit(waiting)
        with pytest.raises(QueueFull, match="at most 2"):
            sched.submit([Sequence([1], SamplingParams(), lambda e: None)])
        running.cancel()
        backend.gate.set()
        wait_for(lambda: backend.freed and not backend.slots and sched.queued == 0)
        assert backend.freed[0] == 0
    finally:
        sched.stop()


def test_backend_failures_do_not_kill_the_worker():
    backend = FakeBackend(fail_add={99}, fail_step_once=True)
    sched = Scheduler(backend, 4, 8).start()
    try:
        bad, broken, good = [], [], []
        sched.submit([Sequence([99], SamplingParams(max_new_tokens=3), bad.append)])
        wait_for(lambda: bad and bad[-1].finish)
        assert bad[-1].finish == "error" and "prefill failed" in bad[-1].error
        sched.submit([Sequence([1], SamplingParams(max_new_tokens=3), broken.append)])
        wait_for(lambda: broken and broken[-1].finish)
        assert broken[-1].finish == "error" and "kernel exploded" in broken[-1].error
        sched.submit([Sequence([1], SamplingParams(max_new_tokens=3), good.append)])
        wait_for(lambda: good and good[-1].finish)
        assert good[-1].finish == "length" and sched.alive
    finally:
        sched.stop()
    assert not sched.alive


# -- detokenization --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_text_stream_equals_full_decode(tok):
    ids = tok("To be, or not to be, that is the question").input_ids
    stream = TextStream(tok, [])
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert text == tok.decode(ids)


@pytest.fixture(scope="module")
def byte_tok():
    """One token per byte, no merges: any id sequence may leave a UTF-8 character unfinished."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_text_stream_holds_partial_utf8(byte_tok):
    ids = byte_tok("é").input_ids
    assert len(ids) == 2  # 0xC3 0xA9: one token per byte
    stream = TextStream(byte_tok, [])
    assert stream.push(ids[0]) == ""
    assert stream.push(ids[1]) + stream.flush() == "é"


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 10**4), max_size=40))
def test_the_direct_decoder_equals_transformers_decode(tok, byte_tok, ids):
    """``decoder`` skips transformers' ``decode`` for the Rust tokenizer's own; any ids (the
    special ones included, skipped as ``skip_special_tokens`` does) give the same text."""
    from ecospa_deploy.serve.detokenize import decoder

    for t in (tok, byte_tok):
        ids_t = [i % len(t) for i in ids]
        assert decoder(t).func.__self__ is t._tokenizer
        assert decoder(t)(ids_t) == t.decode(ids_t, skip_special_tokens=True)


def test_the_direct_decoder_is_not_taken_where_decode_cleans_up_spaces():
    from ecospa_deploy.serve.detokenize import decoder

    tok = tiny_tokenizer()
    tok.clean_up_tokenization_spaces = True
    assert decoder(tok).func.__self__ is tok
    assert decoder(tok)(tok("To be , or").input_ids) == tok.decode(tok("To be , or").input_ids,
                                                                     skip_special_tokens=True)


@pytest.mark.parametrize("stop,want", [("b\ufffd", ("a", "stop")), ("zz", ("ab\ufffd", "length"))])
def test_text_stream_stop_string_found_only_at_the_end(byte_tok, stop, want):
    """Generation ends on a dangling UTF-8 byte: its U+FFFD (and a stop string ending in it)
    only exists once the stream is closed, and the finish reason must say which one ended it."""
    ids = byte_tok("ab").input_ids + byte_tok("é").input_ids[:1]
    stream = TextStream(byte_tok, [stop])
    streamed = "".join(stream.push(t) for t in ids)
    assert not stream.stopped
    text, reason = stream.close("length")
    assert (streamed + text, reason) == want
    assert (streamed + text) == byte_tok.decode(ids)[:len(streamed + text)]


def test_text_stream_stop_string_across_tokens(tok):
    ids = tok("To be, or not to be, that is the question").input_ids
    stream = TextStream(tok, ["not to"])
    out = ""
    for t in ids:
        out += stream.push(t)
        if stream.stopped:
            break
    assert stream.stopped and out + stream.flush() == "To be, or "


# -- app limits: timeout and 429, in process ------------------------------------------------
def _app(backend, *, timeout=30.0, max_queue=8, batch=1):
    metrics = Metrics()
    sched = Scheduler(backend, batch, max_queue, metrics).start()
    service = GenerationService(sched, tiny_tokenizer(), "fake", 64, vocab_size=96,
                                eos_token_ids=(2,), request_timeout=timeout)
    return create_app(service, metrics), sched


async def _post(app, body):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post("/v1/completions", json=body)


def test_request_timeout_is_408_and_frees_the_slot():
    backend = FakeBackend(delay=0.05)
    app, sched = _app(backend, timeout=0.3)
    try:
        resp = asyncio.run(_post(app, {"prompt": [5], "max_tokens": 60}))
        assert resp.status_code == 408 and "timed out" in resp.json()["error"]["message"]
        wait_for(lambda: not backend.slots)
    finally:
        sched.stop()


def test_full_queue_is_429():
    backend = FakeBackend()
    backend.gate.clear()
    app, sched = _app(backend, max_queue=1)

    async def scenario():
        first = asyncio.create_task(_post(app, {"prompt": [5], "max_tokens": 5}))
        await asyncio.to_thread(wait_for, lambda: backend.slots)      # decoding, blocked
        second = asyncio.create_task(_post(app, {"prompt": [5], "max_tokens": 5}))
        await asyncio.to_thread(wait_for, lambda: sched.queued == 1)  # waiting for the slot
        third = await _post(app, {"prompt": [5], "max_tokens": 5})
        backend.gate.set()
        return third, await first, await second

    try:
        third, first, second = asyncio.run(scenario())
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        assert first.status_code == second.status_code == 200
        assert first.json()["usage"]["completion_tokens"] == 5
    finally:
        sched.stop()


# -- a client that goes away frees its slot (real uvicorn on loopback, fake backend) ---------
@pytest.fixture()
def live_server():
    import socket

    import uvicorn

    backend = FakeBackend(delay=0.02)
    app, sched = _app(backend, batch=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", backend
    server.should_exit = True
    thread.join(10)
    sched.stop()


def test_disconnect_frees_slot_streaming(live_server):
    url, backend = live_server
    body = {"prompt": [5], "max_tokens": 60, "stream": True}  # 60 steps x 20 ms if never freed
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as resp:
        next(line for line in resp.iter_lines() if line.startswith("data:"))
    wait_for(lambda: backend.freed, timeout=1.0)
    assert not backend.slots and len(backend.batches) < 40


def test_disconnect_frees_slot_non_streaming(live_server):
    url, backend = live_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 60}, timeout=0.2)
    wait_for(lambda: backend.freed, timeout=1.0)
    assert not backend.slots and len(backend.batches) < 40


class _Recording:
    """An engine whose calls are logged in order: ("add", n), ("chunk", end), ("step", slots)."""

    def __init__(self, engine, chunk_delay: float = 0.0) -> None:
        self.engine, self.log, self.chunk_delay = engine, [], chunk_delay

    def add(self, slot, prompt_ids, params):
        self.log.append(("add", len(prompt_ids)))
        return self.engine.add(slot, prompt_ids, params)

    def add_chunk(self, slot, prompt_ids, params, end):
        self.log.append(("chunk", end))
        time.sleep(self.chunk_delay)
        return self.engine.add_chunk(slot, prompt_ids, params, end)

    def step(self):
        out = self.engine.step()
        self.log.append(("step", sorted(out)))
        return out

    def free(self, slot):
        self.engine.free(slot)


def _run_two(prefill_chunk):
    """A running stream, then a 45-token prompt; the tokens of both and the backend's log."""
    from ecospa_deploy.engine import Engine
    from ecospa_deploy.testing import tiny_pruned

    backend = _Recording(Engine(tiny_pruned("llama", seed=5), max_batch_size=2, max_seq_len=96))
    sched = Scheduler(backend, 2, 4, prefill_chunk=prefill_chunk).start()
    got: dict[str, list] = {"a": [], "b": []}
    a = Sequence([5, 6, 7], SamplingParams(max_new_tokens=20), got["a"].append)
    long = [(3 * i) % 40 + 3 for i in range(45)]
    b = Sequence(long, SamplingParams(max_new_tokens=6), got["b"].append)
    sched.submit([a])
    wait_for(lambda: len(got["a"]) >= 3)
    sched.submit([b])
    wait_for(lambda: a.done and b.done, timeout=30)
    sched.stop()
    return {k: [e.token for e in v if e.token is not None] for k, v in got.items()}, backend.log


def test_chunked_prefill_interleaves_a_long_prompt_with_running_decodes():
    whole, whole_log = _run_two(None)
    chunked, log = _run_two(16)
    assert chunked == whole and len(chunked["b"]) == 6          # the same tokens
    assert ("add", 45) in whole_log and ("add", 45) not in log
    chunks = [e for e in log if e[0] == "chunk"]
    assert chunks == [("chunk", 16), ("chunk", 32), ("chunk", 45)]
    # between two chunks of the long prompt the running stream decoded (and only it)
    first, last = log.index(("chunk", 16)), log.index(("chunk", 45))
    between = [e for e in log[first:last] if e[0] == "step"]
    assert len(between) >= 2 and all(e[1] == [0] for e in between)


def test_a_cancelled_sequence_gives_back_its_slot_mid_prefill():
    from ecospa_deploy.engine import Engine
    from ecospa_deploy.testing import tiny_pruned

    backend = _Recording(Engine(tiny_pruned("llama", seed=5), max_batch_size=1, max_seq_len=96),
                         chunk_delay=0.05)
    sched = Scheduler(backend, 1, 4, prefill_chunk=4).start()
    events: list[TokenEvent] = []
    seq = Sequence(list(range(3, 83)), SamplingParams(max_new_tokens=4), events.append)
    sched.submit([seq])
    wait_for(lambda: any(e[0] == "chunk" for e in backend.log))
    seq.cancel()
    wait_for(lambda: seq.done)
    assert events[-1].finish == "cancelled"
    after = []
    sched.submit([Sequence([5, 6], SamplingParams(max_new_tokens=2), after.append)])
    wait_for(lambda: after and after[-1].finish is not None)
    sched.stop()
    assert after[-1].finish == "length" and backend.engine._partial == {}
    assert max(e[1] for e in backend.log if e[0] == "chunk") < 80   # stopped mid-prompt


def test_several_decode_steps_per_tick_when_nothing_waits():
    from ecospa_deploy.engine import Engine
    from ecospa_deploy.testing import tiny_pruned

    def run(decode_steps):
        engine = Engine(tiny_pruned("llama", seed=5), max_batch_size=4, max_seq_len=64)
        calls = []
        original = engine.launch
        engine.launch = lambda n: (calls.append(n), original(n))[1]
        sched = Scheduler(engine, 4, 8, decode_steps=decode_steps).start()
        got = {i: [] for i in range(3)}
        seqs = [Sequence([3 + i, 4, 5], SamplingParams(max_new_tokens=m, temperature=0.7,
                                                       seed=i), got[i].append)
                for i, m in enumerate((5, 17, 12))]
        sched.submit(seqs)
        wait_for(lambda: all(s.done for s in seqs), timeout=30)
        sched.stop()
        return {i: [e.token for e in v if e.token is not None] for i, v in got.items()}, calls

    single, _ = run(1)
    multi, calls = run(4)
    assert multi == single and [len(single[i]) for i in range(3)] == [5, 17, 12]
    assert max(calls) == 4 and len(calls) < 17          # several tokens per host sync
    assert all(n <= 4 for n in calls)


def test_a_step_wakes_each_event_loop_once():
    """The tokens of one step reach the event loop in one call_soon_threadsafe, not one per
    sequence (each is a self-pipe write and a loop wake-up)."""
    from ecospa_deploy.serve.scheduler import asyncio_sink

    loop = asyncio.new_event_loop()
    queue: asyncio.Queue = asyncio.Queue()
    wakeups = []
    original = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(len(a[0])), original(fn, *a))[1]
    backend = FakeBackend(delay=0.005)
    backend.gate.clear()
    sched = Scheduler(backend, 8, 16).start()
    seqs = [Sequence([1, 2], SamplingParams(max_new_tokens=6), asyncio_sink(loop, queue, i))
            for i in range(8)]
    sched.submit(seqs)
    time.sleep(0.05)
    backend.gate.set()                               # every sequence admitted before a step
    wait_for(lambda: all(s.done for s in seqs))
    sched.stop()
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    loop.close()
    assert len(events) == 8 * 7                      # 6 tokens and the finish, per sequence
    assert sum(wakeups) == 8 * 7 and len(wakeups) <= 8   # a batch per step, not per event


def test_the_chunk_follows_the_prefill_rate_of_long_prompts_only():
    """A short prompt's prefill time is fixed overhead (~5 ms on a GPU whatever its length):
    read as a rate it shrank the chunk on the H200 until every 1024-token prompt was cut up."""
    class Chunky(FakeBackend):
        def add_chunk(self, slot, prompt_ids, params, end):
            return None

    sched = Scheduler(Chunky(), 2, 4, prefill_chunk=2048, max_pause=0.25)
    sched._active[0] = object()                       # a running stream: the pause matters
    for _ in range(20):
        sched._measure(16, 0.005)                     # 3 200 tokens/s, if it counted
    assert sched._prefill_rate is None and sched._budget() == 2048
    sched._measure(512, 2.0)                          # a CPU: 256 tokens/s
    assert sched._budget() == 64
    sched._active.clear()
    assert sched._budget() == 2048                    # nothing runs: no pause to bound


class Batched(FakeBackend):
    """FakeBackend with ``add_many`` and ``add_chunk``; ``log`` records prefills and steps."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.log: list = []
        self.fail_many = False

    def add_many(self, slots, prompts, params):
        if self.fail_many:
            raise RuntimeError("batched prefill exploded")
        self.log.append(("many", [len(p) for p in prompts]))
        return [self.add(s, p, q) for s, p, q in zip(slots, prompts, params)]

    def add_chunk(self, slot, prompt_ids, params, end):
        self.log.append(("chunk", end))
        if end < len(prompt_ids):
            return None
        return self.add(slot, prompt_ids, params)

    def step(self):
        out = super().step()
        self.log.append(("step", len(out)))
        return out


def test_submit_many_queues_each_request_all_or_none_and_prefills_them_together():
    backend = Batched()
    backend.gate.clear()                                # the running sequence's step blocks
    sched = Scheduler(backend, 8, 4).start()
    events = [[] for _ in range(7)]
    try:
        sched.submit([Sequence([3], SamplingParams(max_new_tokens=2), events[0].append)])
        wait_for(lambda: backend.slots)

        def seq(i, n):
            return Sequence([3] * n, SamplingParams(max_new_tokens=2), events[i].append)
        errors = sched.submit_many([[seq(1, 5), seq(2, 2)], [seq(3, 1)] * 3, [seq(4, 4)],
                                    [seq(5, 1)], [seq(6, 1)]])
        # 2 queued; 3 more would be 5 > 4: refused whole; then 1 and 1 fit; the last does not
        assert [type(e).__name__ if e else None for e in errors] == \
            [None, "QueueFull", None, None, "QueueFull"]
        assert sched.queued == 4 and sched.metrics.queue_depth._value.get() == 4
        backend.gate.set()
        wait_for(lambda: all(events[i] and events[i][-1].finish for i in (0, 1, 2, 4, 5)))
    finally:
        sched.stop()
    assert ("many", [1, 2, 4, 5]) in backend.log     # the four, one shortest-first prefill
    assert not events[3] and not events[6]


def test_prompts_that_fit_prefill_together_and_only_a_prompt_over_the_budget_is_cut():
    backend = Batched()
    backend.gate.clear()
    sched = Scheduler(backend, 8, 8, prefill_chunk=40).start()
    try:
        events = [[] for _ in range(5)]
        sched.submit([Sequence(list(range(3, 3 + n)), SamplingParams(max_new_tokens=3),
                               events[i].append) for i, n in enumerate([50, 1, 30, 7, 30])])
        wait_for(lambda: backend.log)
        backend.gate.set()
        wait_for(lambda: all(e and e[-1].finish for e in events))
    finally:
        sched.stop()
    prefills = [e for e in backend.log if e[0] != "step"]
    # step 1: 1 + 7 + 30 together; the second 30 does not fit the 2 tokens left and waits
    # whole for step 2 (not cut); the 50-token prompt is longer than a step: cut 10 + 40
    assert prefills[0] == ("many", [1, 7, 30])
    assert ("chunk", 10) in prefills and ("chunk", 50) in prefills
    assert backend.added == [1, 7, 30, 30, 50]
    assert not [e for e in prefills if e[0] == "chunk" and e[1] not in (10, 50)]
    assert backend.log.index(("step", 3)) < backend.log.index(("chunk", 10))
    assert [len(e) for e in events] == [4] * 5


def test_a_failed_batched_prefill_falls_back_to_one_add_each():
    backend = Batched(fail_add={7})
    backend.fail_many = True
    sched = Scheduler(backend, 4, 4).start()           # no chunking: all admitted together
    try:
        events = [[] for _ in range(3)]
        sched.submit([Sequence([p, 4, 5], SamplingParams(max_new_tokens=2), events[i].append)
                      for i, p in enumerate([3, 7, 9])])
        wait_for(lambda: all(e and e[-1].finish for e in events))
    finally:
        sched.stop()
    assert events[1][-1].finish == "error" and "bad prompt" in events[1][-1].error
    assert [e[-1].finish for e in (events[0], events[2])] == ["length", "length"]
    assert sorted(backend.freed) == [0, 2]             # the two that ran were freed
    assert sorted(sched._free) == [0, 1, 2, 3]         # and the failed one's slot came back
    # the two prefilled alone count as calls of one prompt; the failed batch counts nothing
    assert (sched.metrics.prefill_batch_size._sum.get(), _count(sched.metrics)) == (2, 2)


def _count(metrics) -> float:
    return next(s.value for m in metrics.prefill_batch_size.collect() for s in m.samples
                if s.name.endswith("_count"))


@pytest.mark.parametrize("batched", [True, False])
def test_prefill_batch_size_counts_prompts_per_prefill_call(batched):
    """A burst submitted at once is one ``add_many`` call of 5 prompts (without ``add_many``:
    5 calls of 1): what ``ecospa_prefill_batch_size`` reports per call."""
    backend = Batched() if batched else FakeBackend()
    sched = Scheduler(backend, 8, 8).start()
    try:
        events = [[] for _ in range(5)]
        sched.submit([Sequence([3] * n, SamplingParams(max_new_tokens=2), events[i].append)
                      for i, n in enumerate([4, 1, 3, 2, 5])])
        wait_for(lambda: all(e and e[-1].finish for e in events))
    finally:
        sched.stop()
    assert sched.metrics.prefill_batch_size._sum.get() == 5
    assert _count(sched.metrics) == (1 if batched else 5)


def test_the_server_engine_prefills_within_the_step_budget():
    """build_backend bounds the engine's prefill batches by the scheduler's step, so warm-up
    captures several-row graphs only for widths a step reaches; without a step, the default."""
    from ecospa_deploy.engine import Engine
    from ecospa_deploy.serve.server import build_backend
    from ecospa_deploy.testing import tiny_pruned

    model = tiny_pruned("llama", seed=3)
    eng = build_backend("engine", model, 4, 64, torch.device("cpu"), torch.float32,
                        step_tokens=512)
    assert isinstance(eng, Engine) and eng.max_prefill_tokens == 512
    default = build_backend("engine", model, 4, 64, torch.device("cpu"), torch.float32)
    assert default.max_prefill_tokens == Engine(model, max_batch_size=4,
                                                max_seq_len=64).max_prefill_tokens
    # prompts pack by default; --no-packed-prefill pads rows; compiling stays off on the CPU
    assert default.packed_prefill and default._prefill_packed == default.forward.prefill_packed
    rows = build_backend("engine", model, 4, 64, torch.device("cpu"), torch.float32,
                         packed_prefill=False, compile_prefill=True)
    assert not rows.packed_prefill and rows._prefill_packed == rows.forward.prefill_packed


def test_server_steps_default_to_8192_prompt_tokens_on_cuda_and_512_on_cpu():
    from ecospa_deploy.serve.server import ServeOptions, _core_config, step_tokens

    assert step_tokens(None, torch.device("cuda")) == 8192
    assert step_tokens(None, torch.device("cpu")) == 512
    assert step_tokens(0, torch.device("cuda")) == 0 and step_tokens(96, torch.device("cpu")) == 96
    config = _core_config(ServeOptions(path="m", packed_prefill=False, compile_prefill=False),
                          "engine")
    assert (config.packed_prefill, config.compile_prefill) == (False, False)
    # run 10: the compiled packed prefill is the default on CUDA, the engine process's too
    default = _core_config(ServeOptions(path="m"), "engine")
    assert (default.packed_prefill, default.compile_prefill) == (True, True)


def _engine_run(async_decode: bool, record: list | None = None):
    """Eight sequences in two waves through the scheduler and the tiny engine, greedy and
    sampled, some ending on a stop token, one cancelled: the events each one received."""
    from ecospa_deploy.engine import Engine
    from ecospa_deploy.testing import tiny_pruned

    engine = Engine(tiny_pruned("llama", seed=9), max_batch_size=4, max_seq_len=96)
    if record is not None:
        for name in ("launch", "collect"):
            original = getattr(engine, name)
            setattr(engine, name, lambda *a, _f=original, _n=name: (record.append(_n), _f(*a))[1])
    sched = Scheduler(engine, 4, 16, async_decode=async_decode).start()
    got = {i: [] for i in range(8)}
    params = [SamplingParams(max_new_tokens=m, temperature=0.8 * (i % 2), seed=i,
                             stop_token_ids=(32,) if i % 3 == 0 else ())
              for i, m in enumerate((9, 30, 4, 17, 25, 2, 40, 11))]
    seqs = [Sequence([3 + i, 4 + i % 5, 5], params[i], got[i].append) for i in range(8)]
    sched.submit(seqs[:5])
    wait_for(lambda: len(got[1]) >= 5, timeout=30)
    seqs[4].cancel()
    sched.submit(seqs[5:])
    wait_for(lambda: all(s.done for s in seqs), timeout=60)
    sched.stop()
    assert engine.active_slots == [] and engine._busy() == []
    return {i: [e.token for e in v if e.token is not None] for i, v in got.items() if i != 4}, \
        {i: v[-1].finish for i, v in got.items()}


def test_async_decode_gives_the_tokens_of_the_synchronous_loop():
    """Launching step N+1 before handling step N's tokens changes no sequence's tokens or end:
    a sequence that stopped or was cancelled while a step was in flight gets nothing of it,
    and a sequence admitted into its freed slot meanwhile gets only its own."""
    record: list = []
    sync_tokens, sync_ends = _engine_run(False)
    async_tokens, async_ends = _engine_run(True, record)
    assert async_tokens == sync_tokens and async_ends == sync_ends
    assert async_ends[4] == "cancelled" and async_ends[0] == async_ends[3] == "stop"
    assert async_tokens[0][-1] == 32 and [len(async_tokens[i]) for i in (2, 5)] == [4, 2]
    # overlap: the next step is launched before the previous one's tokens are collected
    assert record[:3] == ["launch", "launch", "collect"]


def test_serve_s_prefill_flags_reach_its_options():
    """`ecospa serve` compiles its packed prefill unless told not to (run 10 measured it)."""
    import argparse

    from ecospa_deploy.commands.serve import add_arguments
    from ecospa_deploy.serve.server import ServeOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def options(*flags):
        return ServeOptions(**vars(parser.parse_args(["m", *flags])))

    assert (options().compile_prefill, options().packed_prefill) == (True, True)
    assert options("--no-compile-prefill").compile_prefill is False
    assert options("--compile-prefill").compile_prefill is True
    assert options("--no-packed-prefill").packed_prefill is False
    assert options("--no-compile").compile is False
    assert options().prefill_order == "shortest"
    assert options("--prefill-order", "arrival").prefill_order == "arrival"
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--prefill-order", "longest"])
    # the engine core (--engine-process) gets it too
    from ecospa_deploy.serve.server import _core_config

    assert _core_config(options("--prefill-order", "arrival"), "engine").prefill_order == "arrival"
