"""The server's start-up heap frozen out of the collector, and the collector's pauses timed."""

import gc
import logging

import pytest

from ecospa_deploy.serve import gc_heap


@pytest.fixture
def settled():
    yield
    gc_heap.reset()


def test_pauses_count_time_and_longest_per_generation():
    ticks = iter([1.0, 1.5, 2.0, 2.25, 3.0, 4.0])
    pauses = gc_heap.GcPauses(clock=lambda: next(ticks))
    pauses("start", {"generation": 2})
    pauses("stop", {"generation": 2})          # 0.5 s
    pauses("start", {"generation": 0})
    pauses("stop", {"generation": 0})          # 0.25 s
    pauses("start", {"generation": 2})
    pauses("stop", {"generation": 2})          # 1.0 s
    assert pauses.count == [1, 0, 2]
    assert pauses.total_s == [0.25, 0.0, 1.5]
    assert pauses.max_s == [0.25, 0.0, 1.0]
    assert pauses.summary().endswith("gen2 2 collections, 1500.0 ms, longest 1000.0 ms")


def test_a_stop_without_its_start_is_not_counted():
    pauses = gc_heap.GcPauses(clock=lambda: 5.0)
    pauses("stop", {"generation": 1})
    assert pauses.count == [0, 0, 0]


def test_settle_freezes_what_lives_and_times_later_collections(settled, caplog):
    keep = [[i] for i in range(1000)]           # long-lived, tracked by the collector
    with caplog.at_level(logging.INFO, logger="ecospa_deploy.serve"):
        frozen = gc_heap.settle()
    assert frozen >= len(keep) and gc.get_freeze_count() >= len(keep)
    assert not any(o is keep for o in gc.get_objects(2))   # frozen: no generation holds it
    gc.collect()
    gc.collect(0)
    with caplog.at_level(logging.INFO, logger="ecospa_deploy.serve"):
        line = gc_heap.report()
    assert "gen2 1 collections" in line and "gen0" in line
    assert f"gc: {frozen} start-up objects frozen" in caplog.text
    assert "gc while serving: gen0" in caplog.text


def test_settle_twice_times_collections_once(settled):
    gc_heap.settle()
    gc_heap.settle()                            # its own collection is timed: the first one
    gc.collect()
    assert sum(isinstance(c, gc_heap.GcPauses) for c in gc.callbacks) == 1
    assert "gen2 2 collections" in gc_heap.report()


def test_report_before_settle_is_none():
    assert gc_heap.report() is None
