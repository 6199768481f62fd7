"""The server's burst without HTTP: the scheduler and the engine alone, dense vs pruned twin.

``python -m ecospa_deploy.bench.serve_replay --shape llama-1b --out DIR`` builds each twin's
engine as ``ecospa serve`` does on CUDA (``build_backend``, every graph captured at start),
drives a ``Scheduler`` with the same 64 prompts and ``max_tokens`` mix as ``serve_gpu``'s burst
through plain callable sinks, and writes ``serve_replay_<shape>.json``: wall time and output
tokens/s and TTFT p50/p99 of a warm burst (all submitted at once: TTFT without HTTP or
tokenizing), decode steps, and where the scheduler thread's time went (prefill
calls, decode calls, the rest), timed with a device sync around each backend call (the syncs
cost a little; a second, untimed burst gives the clean wall). Set against the HTTP server's
figures on the same burst, the difference is what HTTP, SSE and detokenizing cost; set
against ``floor`` (prefill FLOPs at the matmul ceiling plus the decode steps at the engine's
own step), it is what the scheduler loses.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch


class _Timed:
    """Wraps a backend: seconds spent in each method, with a device sync on both sides."""

    def __init__(self, backend, timed: bool):
        self._b, self.timed = backend, timed
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name):
        fn = getattr(self._b, name)
        if not callable(fn) or name not in ("add", "add_many", "add_chunk", "step", "steps",
                                            "launch", "collect"):
            return fn

        def call(*args, **kw):
            if not self.timed:
                return fn(*args, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            return out
        return call


def burst(scheduler, prompts, mix) -> dict:
    from ecospa_deploy.engine.sampling import SamplingParams
    from ecospa_deploy.serve.loadtest import percentile
    from ecospa_deploy.serve.scheduler import Sequence

    done = threading.Event()
    left = [len(prompts)]
    tokens = [0]
    lock = threading.Lock()

    def sink(event):
        with lock:
            if event.token is not None:
                tokens[0] += 1
            if event.finish is not None:
                left[0] -= 1
                if not left[0]:
                    done.set()

    seqs = [Sequence(p, SamplingParams(max_new_tokens=mix[i % len(mix)]), sink)
            for i, p in enumerate(prompts)]
    steps0 = scheduler.steps
    t0 = time.perf_counter()
    scheduler.submit(seqs)
    done.wait(600)
    wall = time.perf_counter() - t0
    ttft = [1e3 * (q.first_token_at - q.arrival) for q in seqs if q.first_token_at is not None]
    return dict(wall_s=round(wall, 4), output_tokens=tokens[0],
                output_tokens_per_s=round(tokens[0] / wall, 1),
                decode_steps=scheduler.steps - steps0,
                ttft_p50_ms=round(percentile(ttft, 50), 2) if ttft else None,
                ttft_p99_ms=round(percentile(ttft, 99), 2) if ttft else None)


def main(argv=None) -> int:
    from ecospa_deploy.benchmark.floor import measure_ceilings
    from ecospa_deploy.benchmark.shapes import build_model
    from ecospa_deploy.bench.serve_gpu import burst_arguments, burst_load, output_name
    from ecospa_deploy.serve.scheduler import Scheduler
    from ecospa_deploy.serve.server import build_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    burst_arguments(ap)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--decode-steps", type=int, default=1)
    ap.add_argument("--no-packed-prefill", dest="packed_prefill", action="store_false",
                    help="as `ecospa serve --no-packed-prefill`: prompts prefill as padded rows")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="as `ecospa serve --no-compile`: the decode step not compiled")
    ap.add_argument("--no-compile-prefill", dest="compile_prefill", action="store_false",
                    help="as `ecospa serve --no-compile-prefill`: the packed prefill eager")
    ap.add_argument("--prefill-order", default="shortest", choices=PREFILL_ORDERS,
                    help="as `ecospa serve --prefill-order`")
    ap.add_argument("--no-async-decode", dest="async_decode", action="store_false",
                    help="as `ecospa serve --no-async-decode`")
    ap.add_argument("--which", default="dense,pruned")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    shape, _, prompts, mix = burst_load(args)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    result = dict(shape=args.shape, requests=args.requests, prompt_lens=args.prompt_lens,
                  max_tokens_mix=mix, prefill_chunk=args.prefill_chunk,
                  decode_steps=args.decode_steps, compile=args.compile,
                  packed_prefill=args.packed_prefill, compile_prefill=args.compile_prefill,
                  async_decode=args.async_decode, prefill_order=args.prefill_order,
                  ceilings=measure_ceilings(dev, dtype).to_dict(), runs={})
    for label in args.which.split(","):
        model = build_model(shape, label == "pruned", dtype, dev)
        t0 = time.perf_counter()
        engine = build_backend("engine", model, args.requests, args.max_model_len, dev, dtype,
                               step_tokens=args.prefill_chunk or None, compile=args.compile,
                               packed_prefill=args.packed_prefill,
                               compile_prefill=args.compile_prefill)
        start_s = time.perf_counter() - t0
        del model
        timed = _Timed(engine, timed=False)
        sched = Scheduler(timed, args.requests, 4 * args.requests,
                          prefill_chunk=args.prefill_chunk, max_pause=None,
                          decode_steps=args.decode_steps,
                          async_decode=args.async_decode,
                          prefill_order=args.prefill_order).start()
        first = burst(sched, prompts, mix)
        clean = burst(sched, prompts, mix)
        timed.timed = True
        split = burst(sched, prompts, mix)
        sched.stop()
        busy = sum(timed.seconds.values())
        run = dict(start_s=round(start_s, 2), first=first, warm=clean, timed=split,
                   seconds={k: round(v, 4) for k, v in timed.seconds.items()},
                   calls=dict(timed.calls),
                   other_s=round(split["wall_s"] - busy, 4))
        result["runs"][label] = run
        print(label, json.dumps(run), flush=True)
        del engine, timed, sched
        torch.cuda.empty_cache()
    runs = result["runs"]
    if "dense" in runs and "pruned" in runs:
        result["pruned_over_dense_tokens_per_s"] = round(
            runs["pruned"]["warm"]["output_tokens_per_s"]
            / runs["dense"]["warm"]["output_tokens_per_s"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_replay_{output_name(shape, args.shape)}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
