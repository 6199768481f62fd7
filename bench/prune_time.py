"""Wall time and peak GPU memory of ``prune_model`` for every method on real shapes.

Random weights and random tokens (time does not depend on values): the dense LLaMA-1B / 7B
shapes of ``ecospa_deploy/benchmark/shapes``, ``--samples`` calibration windows of ``--seq-len`` tokens, the
model in ``--dtype`` (Fisher sums and Gram matrices stay fp32/fp64), ``--target`` of the
parameters. Each (shape, method) builds a fresh model, synchronises, and times ``prune_model``
end to end (calibration passes, scoring, compensation, slicing).

When ``--budget-s`` would be exceeded, EcoSpa on a shape is timed by its pieces instead: one
Fisher pass and one round (plan + in-place slice) are measured and the total is extrapolated
as ``rounds_max × (fisher + round)``, an upper bound since the schedule caps the rounds; the
JSON marks such rows ``"extrapolated": true`` with the measured pieces. Methods that do not fit
at all are listed as skipped.

    python -m ecospa_deploy.bench.prune_time --shapes llama-1b llama-7b --out prune_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ecospa_deploy import dtypes
from ecospa_deploy.benchmark.shapes import build_model, load_shape
from ecospa_deploy.prune.run import METHODS, PruneOptions, prune_model
from ecospa_deploy.prune.tracking import count_params


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fresh(shape, dtype, device):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, pruned=False, dtype=dtype, device=device)
    _sync()
    return model


def time_full(shape, method, windows, args, dtype, device) -> dict:
    model = _fresh(shape, dtype, device)
    opts = PruneOptions(method=method, target_size=args.target, batch_size=args.batch_size,
                        rounds=args.rounds)
    t0 = time.perf_counter()
    result = prune_model(model, windows, opts)
    _sync()
    seconds = time.perf_counter() - t0
    out = {"method": method, "seconds": seconds, "rounds": result.rounds,
           "params_before": result.params_before, "params_after": result.params_after,
           "params_target": result.params_target,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "extrapolated": False}
    del model
    return out


def time_ecospa_pieces(shape, windows, args, dtype, device) -> dict:
    """One Fisher pass and one round, measured; the whole run extrapolated (upper bound)."""
    from ecospa_deploy.prune.ecospa import EcoSpaConfig, ecospa_round, schedule
    from ecospa_deploy.prune.fisher import calibration_fisher
    from ecospa_deploy.prune.floors import Floors
    from ecospa_deploy.prune.tracking import KeptIndices, ParamCounter

    model = _fresh(shape, dtype, device)
    total = count_params(model)
    target = round(args.target * total)
    counter, floors = ParamCounter(model), Floors.of(model.config.ecospa_spec)
    kept = KeptIndices.identity(model.config.ecospa_spec)
    t0 = time.perf_counter()
    fisher = calibration_fisher(model, windows, args.batch_size)
    _sync()
    t1 = time.perf_counter()
    report, _ = ecospa_round(model, fisher, counter, target, EcoSpaConfig(rounds=args.rounds),
                             kept, floors, schedule(total, target, args.rounds, 0))
    _sync()
    t2 = time.perf_counter()
    fisher_s, round_s = t1 - t0, t2 - t1
    return {"method": "ecospa", "extrapolated": True, "fisher_pass_s": fisher_s,
            "round_s": round_s, "rounds_max": args.rounds,
            "seconds": args.rounds * (fisher_s + round_s),
            "first_round_removed": report.params_before - report.params_after,
            "params_before": total, "params_target": target,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def gemm_operands(model, batch) -> list[dict]:
    """Every distinct matmul of one forward + backward, with its operands' shapes, strides and
    16-byte alignment: cuBLAS falls back to slow align-1 kernels when an operand is misaligned."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    seen: dict[str, dict] = {}

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                ts = [a for a in args if isinstance(a, torch.Tensor)]
                key = f"{func.__name__} " + " x ".join(
                    f"{tuple(t.shape)}/{t.stride()}{'' if t.data_ptr() % 16 == 0 else ' MISALIGNED'}"
                    for t in ts)
                seen.setdefault(key, {"op": key, "calls": 0})["calls"] += 1
            return func(*args, **(kwargs or {}))

    from ecospa_deploy.prune.fisher import calibration_fisher

    with Log():
        calibration_fisher(model, batch.to(next(model.parameters()).device), batch.shape[0])
    return list(seen.values())


def profile_fisher(shape, windows, args, dtype, device, batches: int = 2) -> dict:
    """Where one Fisher pass spends its GPU time, and what FFN alignment buys: after a warm
    batch, one whole pass over ``windows`` (as a round runs it) is timed unpadded
    (``align=0``) and padded to 8 (the default); then ``batches`` batches are profiled with
    ``torch.profiler`` (top CUDA kernels by total time)."""
    from torch.profiler import ProfilerActivity, profile

    from ecospa_deploy.prune.fisher import calibration_fisher

    model = _fresh(shape, dtype, device)
    n = args.batch_size
    calibration_fisher(model, windows[:n], n)
    _sync()
    tokens_per_s = {}
    for align in (0, 8):
        t0 = time.perf_counter()
        calibration_fisher(model, windows, n, align=align)
        _sync()
        tokens_per_s[f"align_{align}"] = windows.numel() / (time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        calibration_fisher(model, windows[:n * batches], n)
        _sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    kernels = [{"name": e.key[:120], "cuda_ms": e.device_time_total / 1e3, "calls": e.count}
               for e in rows[:25]]
    gemms = gemm_operands(model, windows[:n])
    del model
    return {"method": "profile_fisher", "batch_size": n, "batches": batches, "gemms": gemms,
            "tokens_per_s": tokens_per_s,
            "align_speedup": tokens_per_s["align_8"] / tokens_per_s["align_0"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "kernels": kernels, "table": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecospa_deploy.bench.prune_time")
    p.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-7b"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch-size", type=int, nargs="+", default=[4],
                   help="windows per pass, one value per shape (the last repeats)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="wall budget; past it EcoSpa is timed by pieces and the rest skipped")
    p.add_argument("--pieces", nargs="*", default=[], help="shapes whose EcoSpa is always "
                   "timed by pieces (one Fisher pass + one round)")
    p.add_argument("--profile", action="store_true", help="profile one Fisher pass per shape "
                   "(top CUDA kernels) before timing the methods")
    p.add_argument("--out", default="prune_time.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prune_time needs a CUDA device")
    device, dtype = torch.device("cuda"), dtypes.to_torch(args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "samples": args.samples,
              "seq_len": args.seq_len, "target_size": args.target, "dtype": args.dtype,
              "rounds_max": args.rounds, "command": "python -m ecospa_deploy.bench.prune_time "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "results": {}}
    sizes = args.batch_size
    for n, name in enumerate(args.shapes):
        shape = load_shape(name)
        vocab = shape["dense"]["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, vocab, (args.samples, args.seq_len), generator=gen)
        rows = []
        args.batch_size = sizes[min(n, len(sizes) - 1)]
        if args.profile:
            row = profile_fisher(shape, windows, args, dtype, device)
            print(row.pop("table"), flush=True)
            rows.append(row)
        for method in args.methods:
            left = args.budget_s - (time.perf_counter() - start)
            try:
                if method == "ecospa" and (name in args.pieces or left < 300):
                    row = time_ecospa_pieces(shape, windows, args, dtype, device)
                elif left < 60:
                    row = {"method": method, "skipped": f"budget ({left:.0f} s left)"}
                else:
                    row = time_full(shape, method, windows, args, dtype, device)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"method": method, "error": f"out of memory: {str(exc)[:200]}"}
            row["batch_size"] = args.batch_size
            rows.append(row)
            print(name, json.dumps(row), flush=True)
            report["results"][name] = rows
            Path(args.out).write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, rows in report["results"].items():
        for r in rows:
            if "seconds" in r:
                tag = " (extrapolated)" if r.get("extrapolated") else ""
                print(f"{name:9s} {r['method']:10s} {r['seconds']:8.1f} s{tag}  "
                      f"peak {r['peak_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
