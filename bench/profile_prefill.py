"""Prefill profile of the engine on one shape: where a packed prefill's time goes.

``python -m ecospa_deploy.bench.profile_prefill --shape llama-1b --tokens 2048 8192
--prompt-len 256 --json OUT.json`` prefills ``tokens / prompt-len`` prompts together (as the
server's ``add_many`` does) into a warmed engine, for dense and pruned, and reports per row:

- ``call_ms``: the whole call as the scheduler sees it (packing on the host, input copies,
  the graph, sampling the first tokens, the host sync), median of ``--iters``;
- ``replay_ms``: the device time of the prefill alone (the captured graph; eager on CPU);
- ``floor_ms``: its matmul FLOPs (``benchmark.floor.prefill_flops``, each prompt causal to
  itself) at the measured matmul ceiling, and ``pct_floor`` = floor / replay;
- ``kernels``: device time by kind (``gemm``, ``attention``, ``other``: norms, RoPE, SiLU,
  cache writes) over one uncaptured run of what the graph holds, under the profiler.

``--compile-prefill`` runs the same with the packed prefill compiled (the A/B for
``Engine(compile_prefill=True)``).

The burst's prefill took 2.7-3.0x its floor time (bench/results/serve_h200/RUNS.md, run 9);
these rows say whether the host (call vs replay), the matmuls, or the small kernels hold it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GEMM = ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "aten::mm", "aten::addmm",
        "aten::linear", "aten::bmm")
ATTENTION = ("flash", "fmha", "attention", "varlen")


def kind(name: str) -> str:
    """``gemm``, ``attention`` or ``other`` for a kernel (or, on CPU, an aten op) name."""
    low = name.lower()
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in GEMM):
        return "gemm"
    return "other"


def _prompts(tokens: int, prompt_len: int, max_len: int, slots: int) -> list[list[int]]:
    n = min(max(1, tokens // prompt_len), slots)
    length = min(prompt_len, max_len, max(1, tokens // n))
    return [[3 + (7 * i + j) % 97 for j in range(length)] for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(engine, prompts: list[list[int]], iters: int) -> float:
    """Median ms of one ``_prefill_rows`` of ``prompts`` with its host sync (``add_many``'s
    prefill, the slot bookkeeping aside)."""
    from ecospa_deploy.engine import SamplingParams

    slots = list(range(len(prompts)))
    for s in slots:
        engine._set_params(s, SamplingParams(max_new_tokens=1))
    times = []
    for _ in range(iters + 2):
        _sync(engine.device)
        t0 = time.perf_counter()
        engine._prefill_rows(slots, prompts).tolist()
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return 1e3 * times[len(times) // 2]


def _uncaptured(engine, prompts: list[list[int]]):
    """A call running what the captured graph holds for ``prompts`` without the graph: the
    packed prefill on the device (compiled with ``--compile-prefill``), or on the CPU its
    per-prompt reference."""
    from ecospa_deploy.engine.packing import packed_inputs

    lens = [len(p) for p in prompts]
    args = [a.to(engine.device) for a in packed_inputs(
        list(range(len(prompts))), prompts, sum(lens), len(prompts), engine.max_seq_len)]
    if engine._flash:
        return lambda: engine._prefill_packed(*args, max(lens))
    return lambda: engine.forward.prefill_packed(*args, max(lens), lens)


def replay_ms(engine, prompts: list[list[int]], iters: int) -> float:
    """Median device ms of the prefill alone: the captured graph of its bucket (CUDA), or the
    uncaptured prefill (CPU)."""
    from ecospa_deploy.engine.packing import packed_bucket

    if engine.device.type != "cuda" or not engine.prefill_graphs:
        run = _uncaptured(engine, prompts)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2]
    graph = engine._packed_graphs[packed_bucket(sum(map(len, prompts)))][0]
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def kernel_ms(engine, prompts: list[list[int]]) -> dict[str, float]:
    """Device (CPU: self CPU) ms by ``kind`` over one uncaptured prefill of ``prompts``."""
    from torch.profiler import ProfilerActivity, profile

    dev = engine.device
    cuda = dev.type == "cuda"
    run = _uncaptured(engine, prompts)
    run()
    _sync(dev)
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        run()
        _sync(dev)
    out = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        if cuda:
            t = getattr(ev, "self_device_time_total", None) or \
                getattr(ev, "self_cuda_time_total", 0)
        else:
            t = ev.self_cpu_time_total
        if t:
            out[kind(ev.key)] += t / 1e3
    return {k: round(v, 3) for k, v in out.items()}


@torch.no_grad()
def profile_rows(label: str, engine, facts: dict, tokens: list[int], prompt_len: int,
                 ceilings, iters: int = 10) -> list[dict]:
    """The rows of one twin (see the module docstring)."""
    from ecospa_deploy.benchmark.floor import prefill_flops, prefill_floor_s

    rows = []
    for t in tokens:
        prompts = _prompts(t, prompt_len, engine.max_seq_len - 1, engine.max_batch_size)
        flops = sum(prefill_flops(facts["spec"], facts["matmul_params"], 1, len(p))
                    for p in prompts)
        floor = 1e3 * prefill_floor_s(flops, ceilings)
        call = call_ms(engine, prompts, iters)
        replay = replay_ms(engine, prompts, iters)
        rows.append(dict(model=label, tokens=sum(map(len, prompts)), prompts=len(prompts),
                         call_ms=round(call, 3), replay_ms=round(replay, 3),
                         floor_ms=round(floor, 3), pct_floor=round(100 * floor / replay, 1),
                         kernels_ms=kernel_ms(engine, prompts)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    from ecospa_deploy.benchmark.floor import measure_ceilings
    from ecospa_deploy.benchmark.harness import shape_engines
    from ecospa_deploy.benchmark.shapes import load_shape
    from ecospa_deploy.dtypes import to_torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192],
                    help="prompt tokens per prefill call")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-seq-len", type=int, default=1280)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile-prefill", action="store_true",
                    help="torch.compile the packed prefill (Engine(compile_prefill=True)) "
                    "before its graphs are captured")
    ap.add_argument("--which", default="dense,pruned")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), to_torch(args.dtype)
    ceilings = measure_ceilings(dev, dtype, small=dev.type == "cpu")
    rows = []
    for label, engine, facts in shape_engines(
            load_shape(args.shape), args.which.split(","), dtype, dev,
            max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
            max_prefill_tokens=max(args.tokens), compile=args.compile_prefill,
            compile_prefill=args.compile_prefill):
        engine.warmup(max_prompt_len=min(args.prompt_len, args.max_seq_len - 1))
        rows += profile_rows(label, engine, facts, args.tokens, args.prompt_len, ceilings,
                             args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, prompt_len=args.prompt_len,
                           compile_prefill=args.compile_prefill,
                           ceilings=ceilings.to_dict(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
