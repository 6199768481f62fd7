"""The server's start-up heap frozen out of Python's cyclic collector, and its pauses timed.

Loading and warming up a model leaves hundreds of thousands of long-lived objects (modules,
tokenizer tables; after a compiled warm-up, FX graphs, guards, sympy expressions, kernel
launchers). Every full collection walks all of them while the thread that triggered it, often
the decode loop, waits: 0.18-0.29 s per collection at 0.36-0.52 M objects on one core of a
2-core machine, and a cold compile leaves 1.6x the objects of a start from Inductor's cache
(0.7-1.3 M, run 14). ``settle()`` moves them into the permanent generation (``gc.freeze``, as
vLLM does after start-up) so no collection visits them again, and times every collection
from then on; ``report()`` logs what the collector cost the process while it served.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("ecospa_deploy.serve")


class GcPauses:
    """A ``gc.callbacks`` entry: the number, total and longest time of the collections of each
    generation. Collections never overlap (they run under the GIL), so one start time will do."""

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:
            return
        took, gen = self._clock() - self._started, info["generation"]
        self._started = None
        self.count[gen] += 1
        self.total_s[gen] += took
        self.max_s[gen] = max(self.max_s[gen], took)

    def summary(self) -> str:
        return "; ".join(f"gen{g} {self.count[g]} collections, {self.total_s[g] * 1e3:.1f} ms, "
                         f"longest {self.max_s[g] * 1e3:.1f} ms" for g in range(3))


_pauses: GcPauses | None = None


def settle() -> int:
    """Collect, freeze what survives, and start timing collections (once per process; a later
    call freezes what was built since). Returns the number of frozen objects."""
    global _pauses
    gc.collect()
    gc.freeze()
    if _pauses is None:
        _pauses = GcPauses()
        gc.callbacks.append(_pauses)
    frozen = gc.get_freeze_count()
    log.info("gc: %d start-up objects frozen out of collection", frozen)
    return frozen


def report() -> str | None:
    """Log (and return) the collections' cost since ``settle``; None before it."""
    if _pauses is None:
        return None
    line = _pauses.summary()
    log.info("gc while serving: %s", line)
    return line


def reset() -> None:
    """Undo ``settle`` (tests)."""
    global _pauses
    if _pauses is not None:
        gc.callbacks.remove(_pauses)
        _pauses = None
    gc.unfreeze()
