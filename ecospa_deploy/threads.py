"""CPU threads that do not collapse on a busy machine; set before torch is imported.

Measured on the 2-core CI-like machine (``bench/threads_load.py``, results in
``bench/results/threads_load.json``): a matmul loop takes 1.24 s with 2 threads when the machine
is idle, but with four other busy processes 21.8 s with 2 threads and OpenMP's default
(spinning) wait policy, 6.9 s with the passive policy and 5.6 s with 1 thread: spinning threads
wait for a sibling the OS has descheduled. So the CLI, before torch loads:

- sets ``OMP_WAIT_POLICY=PASSIVE`` (idle cost: 1.24 → 1.27 s) unless the user set a policy;
- uses ``ECOSPA_THREADS`` as ``OMP_NUM_THREADS`` when given; else, unless ``OMP_NUM_THREADS``
  is set, takes one thread per core the 1-minute load average leaves free (at least one),
  and leaves torch's default alone on an idle machine.
"""

from __future__ import annotations

import math
import os
from typing import MutableMapping


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def configure(environ: MutableMapping[str, str] = os.environ, load: float | None = None
              ) -> int | None:
    """Set the OpenMP variables in ``environ``; returns the thread count chosen, or None when
    torch's default stands."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    wanted = environ.get("ECOSPA_THREADS")
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"ECOSPA_THREADS={wanted!r}; expected an integer >= 1")
        environ["OMP_NUM_THREADS"] = wanted
        return int(wanted)
    if environ.get("OMP_NUM_THREADS"):
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return None
    n = cores()
    free = max(1, n - math.floor(load))
    if free >= n:
        return None
    environ["OMP_NUM_THREADS"] = str(free)
    return free


__all__ = ["configure", "cores"]
