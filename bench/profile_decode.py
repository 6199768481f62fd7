"""Decode-step profile of the engine on one shape: time per step against the floor, top kernels.

``python -m ecospa_deploy.bench.profile_decode --shape llama-1b --batch 1 --context 256``
prints, for dense and pruned, ms per step, % of the memory floor and (``--kernels``) the
kernels that take the time in one captured step. This is the evidence behind the closing notes
when a target is missed.
"""

from __future__ import annotations

import argparse
import json

import torch

from ecospa_deploy.benchmark.floor import decode_floor_s, measure_ceilings
from ecospa_deploy.benchmark.harness import shape_engines
from ecospa_deploy.benchmark.shapes import load_shape


def step_time(engine, batch: int, context: int, iters: int = 50) -> float:
    """Median seconds of one decode step at ``batch`` rows attending over ``context`` tokens."""
    from ecospa_deploy.engine import SamplingParams

    prompt = [1] * (context - 1)
    for s in range(batch):
        engine.add(s, prompt, SamplingParams(max_new_tokens=iters + 8))
    from ecospa_deploy.engine.engine import batch_bucket, kv_bucket

    nb = batch_bucket(batch, engine.max_batch_size)
    kv_len = kv_bucket(context + 1, engine.max_seq_len)
    for _ in range(3):
        engine._run_decode(nb, kv_len, False)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine._run_decode(nb, kv_len, False)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    for s in range(batch):
        engine.free(s)
    times.sort()
    return times[len(times) // 2]


def top_kernels(engine, batch: int, context: int, n: int = 15) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    from ecospa_deploy.engine.engine import batch_bucket, kv_bucket

    nb = batch_bucket(batch, engine.max_batch_size)
    kv_len = kv_bucket(context + 1, engine.max_seq_len)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine._run_decode(nb, kv_len, False)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append((ev.key[:90], t / 5 / 1e3, ev.count // 5))
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, nargs="+", default=[256])
    ap.add_argument("--compile", default="", help="'' (graphs only), 'default', "
                    "'max-autotune-no-cudagraphs'")
    ap.add_argument("--kernels", action="store_true", help="print the top kernels of a step")
    ap.add_argument("--decode", choices=["fused", "torch", "server"], default="fused",
                    help="the Triton decode step at every batch (default), the PyTorch one "
                    "with SDPA, or what the server runs (fused at batch 1, PyTorch linears "
                    "with the Triton attention above)")
    ap.add_argument("--which", default="dense,pruned")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ceil = measure_ceilings(dev, dtype)
    print(f"bandwidth {ceil.bandwidth / 1e12:.2f} TB/s  matmul {ceil.matmul / 1e12:.0f} TFLOP/s")
    shape = load_shape(args.shape)
    out = []
    compile_mode = (True if args.compile == "default" else args.compile) or False
    for which, eng, facts in shape_engines(shape, args.which.split(","), dtype, dev,
                                           max_batch_size=max(args.batch),
                                           max_seq_len=max(args.context) + 128,
                                           compile=compile_mode,
                                           kernels={"fused": True, "torch": False,
                                                    "server": None}[args.decode]):
        wb, kvb = facts["decode_read_bytes"], facts["kv_bytes_per_token"]
        for b in args.batch:
            for c in args.context:
                t = step_time(eng, b, c)
                floor = decode_floor_s(wb, kvb, b, c, ceil)
                row = dict(model=which, batch=b, context=c, ms=t * 1e3, floor_ms=floor * 1e3,
                           pct_floor=100 * floor / t, weight_gb=wb / 1e9)
                out.append(row)
                print(json.dumps(row))
                if args.kernels:
                    for k in top_kernels(eng, b, c):
                        print(f"   {k[1] * 1e3:8.1f} us x{k[2]:<4d} {k[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=ceil.to_dict(), rows=out), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
