"""The engine core in its own process (``serve/core.py``): same tokens as the in-process
scheduler, cancellation, limits, metrics across the pipe, start errors, a core that dies, and
``ecospa serve --engine-process`` end to end."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.serve.backend import engine_available
from ecospa_deploy.serve.core import CoreConfig, EngineCoreClient, RecordingMetrics, replay
from ecospa_deploy.serve.metrics import Metrics
from ecospa_deploy.serve.process import ServerProcess
from ecospa_deploy.serve.scheduler import NeverFits, QueueFull, Scheduler, Sequence, ShuttingDown
from ecospa_deploy.testing import save_tiny_served

needs_engine = pytest.mark.skipif(engine_available() is not None, reason=str(engine_available()))
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_served(tmp_path_factory.mktemp("core") / "tiny", seed=5)


def _config(path, **kw) -> CoreConfig:
    base = dict(path=str(path), backend="engine", device="cpu", dtype="float32",
                max_batch_size=4, max_model_len=4096, max_queue=8)
    return CoreConfig(**{**base, **kw})


class Collector:
    """A sink per sequence; ``done`` is set when every sequence has ended."""

    def __init__(self, n: int) -> None:
        self.events = [[] for _ in range(n)]
        self.left = n
        self.done = threading.Event()
        self.first = threading.Event()

    def sink(self, i: int):
        def put(event):
            self.events[i].append(event)
            self.first.set()
            if event.finish is not None:
                self.left -= 1
                if self.left == 0:
                    self.done.set()
        return put

    def tokens(self, i: int) -> list[int]:
        return [e.token for e in self.events[i] if e.token is not None]

    def finish(self, i: int) -> str | None:
        return self.events[i][-1].finish if self.events[i] else None


def _run(scheduler, prompts, params) -> Collector:
    got = Collector(len(prompts))
    scheduler.submit([Sequence(p, params, got.sink(i)) for i, p in enumerate(prompts)])
    assert got.done.wait(60)
    return got


def test_recorded_metrics_replay_as_the_in_process_ones():
    rec, direct, replayed = RecordingMetrics(), Metrics(), Metrics()
    for m in (rec, direct):
        m.generation_tokens.inc()
        m.generation_tokens.inc()
        m.prompt_tokens.inc(7)
        m.ttft.observe(0.03)
        m.ttft.observe(0.2)
        m.running.set(3)
        m.running.set(1)
        m.batch_size.observe(4)
    ops = rec.take()
    assert ("generation_tokens", "inc", 2) in ops and ("running", "set", 1) in ops
    assert len(ops) == 6                  # increments summed, the gauge's last value only
    assert rec.take() == []
    replay(replayed, ops)
    def values(m):      # without the *_created timestamps
        return [ln for ln in m.render().decode().splitlines() if "_created" not in ln]
    assert values(replayed) == values(direct)


@needs_engine
def test_the_core_process_gives_the_in_process_tokens(model_dir):
    from ecospa_deploy.loading import load_model
    from ecospa_deploy.serve.server import build_backend
    import torch

    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    model = load_model(model_dir, dtype=torch.float32)
    backend = build_backend("engine", model, 4, 4096, torch.device("cpu"), torch.float32)
    local = Scheduler(backend, 4, 8).start()
    try:
        want = _run(local, PROMPTS, params)
    finally:
        local.stop()
    metrics = Metrics()
    core = EngineCoreClient(_config(model_dir), metrics).start()
    try:
        assert core.alive and core.info["max_model_len"] == 4096
        assert core.info["vocab_size"] == model.config.vocab_size
        got = _run(core, PROMPTS, params)
        for i in range(len(PROMPTS)):
            assert got.tokens(i) == want.tokens(i) and len(got.tokens(i)) == 12
            assert got.finish(i) == "length"
        assert core.busy == 0 and core.queued == 0
        text = metrics.render().decode()
        assert f"ecospa_generation_tokens_total {12.0 * len(PROMPTS)}" in text
        assert f"ecospa_time_to_first_token_seconds_count {float(len(PROMPTS))}" in text
        assert f"ecospa_prefill_batch_size_sum {float(len(PROMPTS))}" in text
    finally:
        core.stop()
    assert not core.alive and core._proc.exitcode == 0


class _Pipe:
    """The core's end of the pipe with messages already waiting, as when a burst arrives while
    the core is busy; EOF once they are read."""

    def __init__(self, msgs: list) -> None:
        self.msgs = list(msgs)

    def recv(self):
        if not self.msgs:
            raise EOFError
        return self.msgs.pop(0)

    def poll(self, timeout=0.0) -> bool:
        return bool(self.msgs)


class _RecordingScheduler:
    """What ``_serve_pipe`` calls on the scheduler: requests of three sequences are refused."""

    def __init__(self) -> None:
        self.seqs: dict = {}
        self.calls: list = []

    def submit_many(self, groups):
        self.calls.append([[seq.id for seq in g] for g in groups])
        return [QueueFull("full") if len(g) == 3 else None for g in groups]

    def abort(self) -> None:
        self.calls.append("abort")


def test_the_core_submits_what_waits_in_the_pipe_together_in_order():
    """Submissions already in the pipe reach the scheduler in one ``submit_many`` (one
    shortest-first prefill), each request all or none; a cancel or abort splits them so it
    lands after what preceded it; ``stop`` ends the loop (what follows it is not submitted)."""
    from ecospa_deploy.serve.core import _serve_pipe

    p = SamplingParams(max_new_tokens=2)
    pipe = _Pipe([("submit", [(1, [5], p, 0.0)]), ("submit", [(2, [6, 7], p, 0.0)]),
                  ("submit", [(3, [1], p, 0.0), (4, [1], p, 0.0), (5, [1], p, 0.0)]),
                  ("cancel", 1), ("submit", [(6, [8], p, 0.0)]), ("abort",), ("stop",),
                  ("submit", [(7, [9], p, 0.0)])])
    sent, scheduler = [], _RecordingScheduler()
    _serve_pipe(pipe, scheduler, sent.append)
    assert scheduler.calls == [[[1], [2], [3, 4, 5]], [[6]], "abort"]
    assert sent == [("events", [(i, None, "error", "full") for i in (3, 4, 5)], [])]
    assert sorted(scheduler.seqs) == [1, 2, 6]       # the refused ones are forgotten
    assert scheduler.seqs[1].cancelled and not scheduler.seqs[2].cancelled


@needs_engine
def test_cancel_limits_and_stop(model_dir):
    core = EngineCoreClient(_config(model_dir, max_batch_size=1, max_queue=2)).start()
    long = SamplingParams(max_new_tokens=3000, temperature=0.0)
    short = SamplingParams(max_new_tokens=3, temperature=0.0)
    try:
        first = Collector(1)
        seq = Sequence([5, 6], long, first.sink(0))
        core.submit([seq])
        assert first.first.wait(30)
        # the one slot is taken: two sequences wait, a third is refused by the API process
        waiting = Collector(2)
        core.submit([Sequence([8], short, waiting.sink(0)), Sequence([9], short, waiting.sink(1))])
        assert core.queued == 2
        with pytest.raises(QueueFull):
            core.submit([Sequence([1], short, lambda e: None)])
        with pytest.raises(NeverFits):
            core.submit([Sequence([1], short, lambda e: None) for _ in range(3)])
        seq.cancel()
        assert first.done.wait(30) and waiting.done.wait(30)
        assert first.finish(0) == "cancelled" and len(first.tokens(0)) < 3000
        assert [len(waiting.tokens(i)) for i in range(2)] == [3, 3]
        assert core.queued == 0 and core.busy == 0
        # stop ends what still runs with "shutdown", then refuses new work
        running = Collector(1)
        core.submit([Sequence([7], long, running.sink(0))])
        assert running.first.wait(30)
    finally:
        core.stop()
    assert running.done.is_set() and running.finish(0) == "shutdown"
    with pytest.raises(ShuttingDown):
        core.submit([Sequence([1], long, lambda e: None)])


@needs_engine
def test_a_core_that_dies_fails_its_sequences_and_turns_unhealthy(model_dir):
    core = EngineCoreClient(_config(model_dir)).start()
    try:
        got = Collector(1)
        core.submit([Sequence([5, 6], SamplingParams(max_new_tokens=3000, temperature=0.0),
                              got.sink(0))])
        assert got.first.wait(30)
        os.kill(core._proc.pid, signal.SIGKILL)
        assert got.done.wait(30)
        assert got.finish(0) == "error" and "exited" in got.events[0][-1].error
        deadline = time.monotonic() + 10
        while core.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not core.alive
        with pytest.raises(ShuttingDown):
            core.submit([Sequence([1], SamplingParams(max_new_tokens=2), lambda e: None)])
    finally:
        core.stop(timeout=5)


def test_a_start_error_in_the_core_is_raised_in_the_api_process(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exception) as info:
        EngineCoreClient(_config(tmp_path)).start(timeout=120)
    assert "config.json" in str(info.value) or "json" in str(info.value).lower()


@needs_engine
def test_ecospa_serve_engine_process_end_to_end(model_dir):
    with ServerProcess(model_dir, "--backend", "engine", "--engine-process",
                       "--max-batch-size", "4") as srv:
        body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        one = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        lines = []
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data:")]
        assert one["usage"]["completion_tokens"] == 8
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert "ecospa_generation_tokens_total 16.0" in metrics
        assert "engine in its own process" in srv.log
        code = srv.stop()
    assert code == 0
    # each process froze its start-up heap and logged its collections at exit
    for who in ("ecospa_deploy.serve[core]:", "ecospa_deploy.serve:"):
        assert f"{who} gc: " in srv.log and f"{who} gc while serving: gen0 " in srv.log


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_engine
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_killed_api_process_takes_the_core_with_it(model_dir):
    srv = ServerProcess(model_dir, "--backend", "engine", "--engine-process").start()
    cores: list[int] = []
    try:
        cores = _children(srv.proc.pid)
        assert cores and all(_running(p) for p in cores), "the core is the API's child"
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(30)
        deadline = time.monotonic() + 30
        while any(_running(p) for p in cores) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in cores)
    finally:
        srv.stop(timeout=5)
        for p in cores:     # never leave an orphan behind when the assertion fails
            if _running(p):
                os.kill(p, signal.SIGKILL)
