"""The burst's prefill plan, without a GPU: scheduler steps, prefill launches, padded tokens.

``python -m ecospa_deploy.bench.prefill_plan --chunks 2048 8192 --out DIR`` drives the server's
``Scheduler`` (shortest prompt first, whole prompts per step budget) with ``serve_gpu``'s burst
over a backend that only records its prefill calls, and lays each ``add_many`` out as the CUDA
engine does (``prefill_layout``: power-of-two row batches within the step's tokens, each
padded to its captured ``prefill_bucket``; and packed, ``packed``: one launch per step padded
to its ``packed_bucket``). It writes ``prefill_plan.json``: per step budget,
the scheduler steps that prefill, the prefill launches, and real vs padded prompt tokens. That
is the work the GPU is handed before the burst's last first token, whatever its speed: the
part of the TTFT gap to the floor (prompts at the matmul ceiling, shortest first, unpadded) that
the plan itself causes.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from pathlib import Path


class PlanBackend:
    """Slot protocol; records each prefill call's prompt lengths and advances a clock at the
    given costs (zero: no clock), computes nothing."""

    def __init__(self, step_tokens: int = 8192, prefill_ms_8k: float = 0.0,
                 step_ms: float = 0.0) -> None:
        # one entry per call: ("many", prompt lengths) for add/add_many, ("chunk", tokens)
        self.calls: list[tuple[str, object]] = []
        self.slots: set[int] = set()
        self.cached: dict[int, int] = {}      # prompt tokens a chunked slot holds so far
        self.step_tokens, self.step_ms = step_tokens, step_ms
        self.ms_per_token = prefill_ms_8k / 8192
        self.clock_ms = 0.0
        self.ttft_ms: list[float] = []        # one per prompt whose prefill finished

    def _prefilled(self, padded_tokens: int, finished: int) -> None:
        self.clock_ms += padded_tokens * self.ms_per_token
        self.ttft_ms += [self.clock_ms] * finished

    def add(self, slot, prompt_ids, params):
        return self.add_many([slot], [prompt_ids], [params])[0]

    def add_many(self, slots, prompts, params):
        lengths = [len(p) for p in prompts]
        self.calls.append(("many", lengths))
        self._prefilled(packed_layout([("many", lengths)], self.step_tokens)["padded_tokens"],
                        len(prompts))
        self.slots.update(slots)
        return [1] * len(prompts)

    def add_chunk(self, slot, prompt_ids, params, upto):
        tokens = upto - self.cached.get(slot, 0)
        self.calls.append(("chunk", tokens))
        if upto < len(prompt_ids):
            self.cached[slot] = upto
            self._prefilled(tokens, 0)
            return None
        self.cached.pop(slot, None)
        self.slots.add(slot)
        self._prefilled(tokens, 1)
        return 1

    def step(self):
        if self.slots:
            self.clock_ms += self.step_ms
        return {slot: 1 for slot in self.slots}

    def free(self, slot):
        self.slots.discard(slot)
        self.cached.pop(slot, None)


def layout(calls: list[tuple[str, object]], step_tokens: int, max_seq: int,
           max_rows: int) -> dict:
    """The engine's launches for the recorded calls (``Engine._prefill_rows`` with graphs; a
    chunk of a long prompt is one eager, unpadded launch: ``Engine.add_chunk``)."""
    from ecospa_deploy.engine.engine import prefill_layout

    real = padded = launches = 0
    rows = Counter()
    for kind, what in calls:
        if kind == "chunk":
            launches, rows[1] = launches + 1, rows[1] + 1
            real, padded = real + what, padded + what
            continue
        for start, end, width in prefill_layout(what, max_rows, step_tokens, max_seq, True):
            n = end - start
            launches, rows[n] = launches + 1, rows[n] + 1
            real += sum(what[start:end])
            padded += n * width
    return dict(prefill_calls=len(calls), launches=launches, rows=dict(sorted(rows.items())),
                real_tokens=real, padded_tokens=padded, padded_over_real=round(padded / real, 3),
                packed=packed_layout(calls, step_tokens))


def packed_layout(calls: list[tuple[str, object]], step_tokens: int) -> dict:
    """The same calls prefilled packed (``Engine._run_packed`` with graphs: one launch per
    ``packed_groups`` group, padded to its ``packed_bucket``; a chunk as in ``layout``)."""
    from ecospa_deploy.engine.packing import packed_bucket, packed_groups

    real = padded = launches = 0
    for kind, what in calls:
        if kind == "chunk":
            launches, real, padded = launches + 1, real + what, padded + what
            continue
        for start, end in packed_groups(what, step_tokens):
            total = sum(what[start:end])
            launches, real, padded = launches + 1, real + total, padded + packed_bucket(total)
    return dict(launches=launches, padded_tokens=padded, padded_over_real=round(padded / real, 3))


def plan(prompts: list[list[int]], mix: list[int], step_tokens: int, max_seq: int,
         max_rows: int = 8, prefill_ms_8k: float = 0.0, step_ms: float = 0.0) -> dict:
    """Run the burst through a ``Scheduler`` over ``PlanBackend``; the plan of its prefills
    (and, given the costs, its TTFT p50/p99 on the clock)."""
    from ecospa_deploy.engine.sampling import SamplingParams
    from ecospa_deploy.serve.loadtest import percentile
    from ecospa_deploy.serve.scheduler import Scheduler, Sequence

    backend = PlanBackend(step_tokens, prefill_ms_8k, step_ms)
    done, left, lock = threading.Event(), [len(prompts)], threading.Lock()

    def sink(event):
        if event.finish is not None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    sched = Scheduler(backend, len(prompts), 4 * len(prompts), prefill_chunk=step_tokens,
                      max_pause=None, async_decode=False)
    seqs = [Sequence(p, SamplingParams(max_new_tokens=mix[i % len(mix)]), sink)
            for i, p in enumerate(prompts)]
    sched.start().submit(seqs)      # queued under one lock: the worker admits them together
    if not done.wait(60):
        raise RuntimeError("the burst did not finish")
    sched.stop()
    clock = {}
    if prefill_ms_8k:
        clock = {f"ttft_{q}_ms": round(percentile(backend.ttft_ms, n), 2)
                 for q, n in (("p50", 50), ("p99", 99))}
    return dict(step_tokens=step_tokens, decode_steps=sched.steps, **clock,
                **layout(backend.calls, step_tokens, max_seq, max_rows))


def main(argv=None) -> int:
    from ecospa_deploy.bench.serve_gpu import burst_arguments, burst_load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    burst_arguments(ap)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--prefill-ms-8k", type=float, default=0.0,
                    help="measured time of an 8 192-token packed prefill (ms): runs the clock")
    ap.add_argument("--step-ms", type=float, default=0.0, help="a decode step's time (ms)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    _, _, prompts, mix = burst_load(args)
    result = dict(shape=args.shape, requests=args.requests, prompt_lens=args.prompt_lens,
                  prompt_tokens=sum(map(len, prompts)), max_model_len=args.max_model_len,
                  prefill_ms_8k=args.prefill_ms_8k, step_ms=args.step_ms,
                  plans=[plan(prompts, mix, c, args.max_model_len,
                              prefill_ms_8k=args.prefill_ms_8k, step_ms=args.step_ms)
                         for c in args.chunks])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_plan.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in result["plans"]:
        print(json.dumps(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
