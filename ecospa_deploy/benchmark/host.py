"""The host a benchmark ran on: its CPU, the cores it may use, how busy it was, and how fast one
of its cores runs the server's kind of Python work.

Part of every served step on a GPU is host work (the scheduler, detokenizing, SSE framing), so
two leases of the same card can serve the same tree at different speeds: run 14's lease served
both twins 9-15 % slower than run 10's with the same decode kernels, while its warm start took
1.3-1.5x as long. GPU serving results record these facts, so that a difference between leases
can be told from one between trees.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from ecospa_deploy.threads import cores


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name from ``/proc/cpuinfo`` (``cpuinfo`` is its text, read when None), else
    what ``platform`` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def _chunk_work(n: int) -> int:
    """``n`` rounds of what a streamed token costs the host in Python: a dict built, a JSON
    chunk encoded and framed, a string grown. Returns the bytes framed (so nothing is elided)."""
    total, text = 0, ""
    for i in range(n):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1,
                 "choices": [{"index": i & 63, "text": " tok", "finish_reason": None}]}
        total += len(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        text = (text + " tok")[-64:]
    return total


def python_probe_ms(rounds: int = 20_000, repeats: int = 5) -> float:
    """Best of ``repeats`` timings of ``rounds`` rounds of per-token host work on one core, in
    ms: a single-thread speed reading comparable across machines (the best, as a busy core
    only adds to it)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _chunk_work(rounds)
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 2)


def host_facts(probe: bool = True) -> dict:
    """CPU model, usable cores, load averages and (with ``probe``) ``python_probe_ms``."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    facts = dict(cpu=cpu_model(), cores=cores(), cpu_count=os.cpu_count(),
                 load_average_1m_5m_15m=load, python=platform.python_version())
    if probe:
        facts["python_probe_ms"] = python_probe_ms()
    return facts


__all__ = ["cpu_model", "host_facts", "python_probe_ms"]
