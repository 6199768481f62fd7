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
import bisect
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Callable


StepCost = Callable[[int, float], float]   # (running streams, their mean context) -> ms


class PlanBackend:
    """Slot protocol; records each prefill call's prompt lengths and advances a clock at the
    given costs (zero: no clock), computes nothing. A decode step costs ``step_ms``, or
    ``step_cost(batch, mean context)`` where the cost of a step is known per shape."""

    def __init__(self, step_tokens: int = 8192, prefill_ms_8k: float = 0.0,
                 step_ms: float = 0.0, step_cost: StepCost | None = None) -> None:
        # one entry per call: ("many", prompt lengths) for add/add_many, ("chunk", tokens)
        self.calls: list[tuple[str, object]] = []
        self.slots: set[int] = set()
        self.cached: dict[int, int] = {}      # prompt tokens a chunked slot holds so far
        self.context: dict[int, int] = {}     # tokens in each running slot's KV cache
        self.step_tokens, self.step_ms, self.step_cost = step_tokens, step_ms, step_cost
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
        self.context.update(zip(slots, lengths))
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
        self.context[slot] = upto
        self._prefilled(tokens, 1)
        return 1

    def step(self):
        if self.slots:
            if self.step_cost is None:
                self.clock_ms += self.step_ms
            else:
                mean = sum(self.context[s] for s in self.slots) / len(self.slots)
                self.clock_ms += self.step_cost(len(self.slots), mean)
            for slot in self.slots:
                self.context[slot] += 1
        return {slot: 1 for slot in self.slots}

    def free(self, slot):
        self.slots.discard(slot)
        self.cached.pop(slot, None)
        self.context.pop(slot, None)


def step_table(path: str | Path, model: str) -> dict[tuple[int, int], float]:
    """``profile_decode``'s measured step times of one twin, ``{(batch, context): ms}``, from
    its ``--json`` file or the JSON lines of its log."""
    text = Path(path).read_text()
    try:
        rows = json.loads(text)["rows"]
    except (ValueError, KeyError, TypeError):
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    table = {(r["batch"], r["context"]): r["ms"] for r in rows
             if r.get("model") == model and "batch" in r}
    if not table:
        raise ValueError(f"{path}: no decode-step rows of the {model!r} model")
    return table


def _between(points: list[int], x: float) -> tuple[int, int, float]:
    """Neighbours of ``x`` in the sorted ``points`` and its weight on the second, linear beyond
    the ends."""
    if len(points) == 1:
        return points[0], points[0], 0.0
    i = min(max(bisect.bisect_left(points, x), 1), len(points) - 1)
    lo, hi = points[i - 1], points[i]
    return lo, hi, (x - lo) / (hi - lo)


def interpolated(table: dict[tuple[int, int], float]) -> StepCost:
    """A step's cost at any (batch, context): bilinear over the profiled grid (every batch at
    every context), linear beyond its edges."""
    batches = sorted({b for b, _ in table})
    contexts = sorted({c for _, c in table})
    missing = [(b, c) for b in batches for c in contexts if (b, c) not in table]
    if missing:
        raise ValueError(f"the step table is not a full grid: no {missing[:3]}")

    def cost(batch: int, context: float) -> float:
        b0, b1, wb = _between(batches, batch)
        c0, c1, wc = _between(contexts, context)
        at = lambda b: table[b, c0] + wc * (table[b, c1] - table[b, c0])   # noqa: E731
        return at(b0) + wb * (at(b1) - at(b0))

    return cost


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
         max_rows: int = 8, prefill_ms_8k: float = 0.0, step_ms: float = 0.0,
         step_cost: StepCost | None = None) -> dict:
    """Run the burst through a ``Scheduler`` over ``PlanBackend``; the plan of its prefills
    (and, given the costs, its TTFT p50/p99 and its wall time and output tokens/s on the clock:
    the GPU's own work back to back, no host time, which a server can approach, not beat)."""
    from ecospa_deploy.engine.sampling import SamplingParams
    from ecospa_deploy.serve.loadtest import percentile
    from ecospa_deploy.serve.scheduler import Scheduler, Sequence

    backend = PlanBackend(step_tokens, prefill_ms_8k, step_ms, step_cost)
    done, left, lock = threading.Event(), [len(prompts)], threading.Lock()

    def sink(event):
        if event.finish is not None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    sched = Scheduler(backend, len(prompts), 4 * len(prompts), prefill_chunk=step_tokens,
                      max_pause=None, async_decode=False)
    budgets = [mix[i % len(mix)] for i in range(len(prompts))]    # output tokens per prompt
    seqs = [Sequence(p, SamplingParams(max_new_tokens=n), sink)
            for p, n in zip(prompts, budgets)]
    sched.start().submit(seqs)      # queued under one lock: the worker admits them together
    if not done.wait(60):
        raise RuntimeError("the burst did not finish")
    sched.stop()
    clock = {}
    if prefill_ms_8k:
        clock = {f"ttft_{q}_ms": round(percentile(backend.ttft_ms, n), 2)
                 for q, n in (("p50", 50), ("p99", 99))}
        clock.update(wall_ms=round(backend.clock_ms, 2),
                     output_tokens_per_s=round(sum(budgets) / backend.clock_ms * 1e3, 1))
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
    ap.add_argument("--step-table", type=Path, default=None,
                    help="profile_decode's output (--json file or log): each decode step "
                         "costs the measured time at its batch and mean context instead")
    ap.add_argument("--step-model", default="dense", help="the twin's rows in --step-table")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    _, _, prompts, mix = burst_load(args)
    table = step_table(args.step_table, args.step_model) if args.step_table else None
    cost = interpolated(table) if table else None
    result = dict(shape=args.shape, requests=args.requests, prompt_lens=args.prompt_lens,
                  prompt_tokens=sum(map(len, prompts)), max_model_len=args.max_model_len,
                  prefill_ms_8k=args.prefill_ms_8k, step_ms=args.step_ms,
                  step_table={f"{b}x{c}": ms for (b, c), ms in sorted(table.items())}
                  if table else None,
                  plans=[plan(prompts, mix, c, args.max_model_len,
                              prefill_ms_8k=args.prefill_ms_8k, step_ms=args.step_ms,
                              step_cost=cost)
                         for c in args.chunks])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_plan.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in result["plans"]:
        print(json.dumps(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
