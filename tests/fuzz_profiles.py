"""Hypothesis profiles for the fuzz suites: ``ci`` (default, bounded so both suites take well
under two minutes on 2 cores) and ``long`` (``ECOSPA_FUZZ=long``: >= 10 000 requests and
>= 10 000 headers and configs). ``ECOSPA_FUZZ_REPORT=FILE`` writes the counts as JSON."""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("ECOSPA_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"ECOSPA_FUZZ={PROFILE!r}; expected ci or long")
_COMMON = dict(deadline=None, derandomize=PROFILE == "ci", database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


def fuzz_settings(ci_examples: int, long_examples: int) -> settings:
    """``ci_examples`` in CI, ``long_examples`` in the long run."""
    return settings(max_examples=ci_examples if PROFILE == "ci" else long_examples, **_COMMON)


COUNTS: Counter = Counter()


def _report() -> None:
    path = os.environ.get("ECOSPA_FUZZ_REPORT")
    if path and COUNTS:
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, "counts": dict(sorted(COUNTS.items()))}, f, indent=2)


atexit.register(_report)
