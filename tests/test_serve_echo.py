"""serve/echo.py: the backends that compute nothing, which the HTTP benchmarks serve over."""

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.serve.echo import AsyncEchoBackend, EchoBackend
from ecospa_deploy.serve.scheduler import Scheduler, Sequence
from serve_fakes import wait_for


class _Clock:
    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(round(s, 9))
        self.now += s


def test_launched_steps_queue_on_the_device_and_collect_waits_for_them():
    clock = _Clock()
    be = AsyncEchoBackend(0.004, ids=[7, 8, 9], clock=clock, sleep=clock.sleep)
    assert be.launch() is None                 # nothing running, nothing launched
    be.add(0, [1], None)
    first = be.launch()                        # device busy 100.000 -> 100.004
    second = be.launch(2)                      # queued behind it: -> 100.012
    clock.now += 0.001
    assert be.collect(first) == {0: [8]}       # the first token (ids[0]) came with add
    assert clock.slept == [0.003]
    assert be.collect(second) == {0: [9, 7]}
    assert clock.slept == [0.003, 0.008]
    clock.now += 1.0                            # device idle: a launch starts now
    third = be.launch()
    assert third[0] == clock.now + 0.004
    assert be.collect(None) == {}


def test_waits_all_makes_collect_wait_for_the_step_launched_ahead_too():
    clock = _Clock()
    be = AsyncEchoBackend(0.004, ids=[7, 8, 9], clock=clock, sleep=clock.sleep, waits_all=True)
    be.add(0, [1], None)
    first = be.launch()                        # 100.000 -> 100.004
    second = be.launch()                       # launched ahead: -> 100.008
    assert be.collect(first) == {0: [8]}
    assert clock.slept == [0.008]              # not 0.004: it waited for the second step too
    assert be.collect(second) == {0: [9]} and clock.slept == [0.008]


def test_a_slot_freed_or_refilled_since_a_launch_gets_none_of_it():
    clock = _Clock()
    be = AsyncEchoBackend(0.001, clock=clock, sleep=clock.sleep)
    be.add(0, [1], None)
    be.add(1, [1], None)
    launched = be.launch()
    be.free(0)
    be.free(1)
    be.add(1, [2], None)                        # a new sequence in slot 1
    assert be.collect(launched) == {}


def _run(backend) -> dict[int, list[int]]:
    sched = Scheduler(backend, 4, 16).start()
    got = {i: [] for i in range(6)}
    seqs = [Sequence([3, 4], SamplingParams(max_new_tokens=m), got[i].append)
            for i, m in enumerate((3, 9, 1, 12, 5, 7))]
    sched.submit(seqs)
    wait_for(lambda: all(s.done for s in seqs), timeout=30)
    sched.stop()
    return {i: [e.token for e in v if e.token is not None] for i, v in got.items()}


def test_the_scheduler_decodes_asynchronously_over_it_with_the_tokens_of_the_sync_echo():
    backend = AsyncEchoBackend(0.0005)
    assert Scheduler(backend, 4, 16).async_decode
    # six sequences over four slots: slots are freed and refilled while steps are in flight
    assert _run(backend) == _run(EchoBackend(None))
