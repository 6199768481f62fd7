"""The paths users run, dense vs pruned twin, in one series: plain HF ``generate``, engine TTFT
at first-seen and repeated prompt lengths, engine prefill against its FLOP floor, decode steps.

``python -m ecospa_deploy.bench.user_paths --shape llama-1b --json OUT.json`` (CUDA only).
``--sections`` picks among ``hf,ttft,prefill,decode``; ``--baseline`` also measures the
behaviour before the fixes (stock SDPA dispatch in the HF model; eager prefill that lets SDPA
pick cuDNN) so one run gives both sides of each ratio. Rows are appended to the JSON as they are
measured, so a run cut short keeps what it has.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import types
from typing import Any

import torch

from ecospa_deploy.benchmark.floor import decode_floor_s, measure_ceilings, prefill_flops, prefill_floor_s
from ecospa_deploy.benchmark.harness import HFBackend, model_facts
from ecospa_deploy.benchmark.shapes import hf_config, build_model, construct, load_shape

NEW_LENGTHS = (97, 131, 250, 513, 128, 1000)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@contextlib.contextmanager
def _stock_dispatch():
    """Our HF models with PyTorch's default SDPA dispatch (the behaviour before the fix)."""
    from ecospa_deploy.modeling import attention

    saved = attention.CUDA_SDPA_BACKENDS
    attention.CUDA_SDPA_BACKENDS = None
    try:
        yield
    finally:
        attention.CUDA_SDPA_BACKENDS = saved


@contextlib.contextmanager
def _unpadded_decode():
    """Our HF models leaving decode steps unpadded (``PAD_MIN_QUERY_LEN = 2``: the
    memory-efficient kernel at the pruned dims), to compare with the default."""
    from ecospa_deploy.modeling import attention

    saved = attention.PAD_MIN_QUERY_LEN
    attention.PAD_MIN_QUERY_LEN = 2
    try:
        yield
    finally:
        attention.PAD_MIN_QUERY_LEN = saved


@contextlib.contextmanager
def _no_pad():
    """Our HF models without the q/k padding that lets flash run (pruned layers)."""
    from ecospa_deploy.modeling import attention

    saved = attention.PAD_FOR_FLASH
    attention.PAD_FOR_FLASH = False
    try:
        yield
    finally:
        attention.PAD_FOR_FLASH = saved


def _top_ops(fn, n: int = 8) -> list[dict]:
    """Top ops by host self time and top kernels by device time of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:n]
    dev = sorted(ev, key=lambda e: -(e.self_device_time_total or 0))[:n]
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                       "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    return ([dict(launches=launches, host_us_total=round(sum(e.self_cpu_time_total for e in ev)))] +
            [dict(op=e.key[:70], host_us=round(e.self_cpu_time_total), count=e.count)
             for e in cpu] +
            [dict(kernel=e.key[:70], device_us=round(e.self_device_time_total or 0),
                  count=e.count) for e in dev])


def _no_cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels ``fn`` runs (none off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return []

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if (e.device_time_total or 0) > 0]


def _stock_model(model, shape, dtype, dev):
    """The family's stock HF class with the same weights (what a user without us runs)."""
    from ecospa_deploy.families import get

    fam = get(shape["family"])
    cfg = hf_config(shape)
    cfg._attn_implementation = "sdpa"
    stock = construct(fam.stock_class(fam.primary_stock), cfg, dtype, dev)
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock.eval()


def hf_rows(shape, dtype, dev, args, emit) -> None:
    """Plain ``generate`` bs 1: every variant built up front, then ``--hf-rounds`` rounds that
    run each variant once (the order rotating per round), so the shared host's drift reaches
    every variant alike. TPOT: the median over rounds of each round's median step."""
    cfg = types.SimpleNamespace(device=dev)
    vocab = shape["dense"]["vocab_size"]
    prompt = [_prompt(args.hf_prompt, vocab, 1)]
    dense = build_model(shape, False, dtype, dev)
    pruned = build_model(shape, True, dtype, dev)
    stock_name = f"stock_{shape['family']}"
    stock = _stock_model(dense, shape, dtype, dev)
    variants = [("dense", "ours", dense, contextlib.nullcontext),
                ("pruned", "ours", pruned, contextlib.nullcontext),
                ("dense", f"{stock_name}_no_cudnn", stock, _no_cudnn),
                ("pruned", "ours_unpadded_decode", pruned, _unpadded_decode)]
    if args.baseline:
        variants += [("dense", stock_name, stock, contextlib.nullcontext),
                     ("dense", "ours_stock_dispatch", dense, _stock_dispatch),
                     ("pruned", "ours_stock_dispatch", pruned, _stock_dispatch),
                     ("pruned", "ours_no_pad", pruned, _no_pad)]
    backends = [HFBackend(m, cfg, 1, 0) for _, _, m, _ in variants]
    # cuDNN's per-shape graph builds make the stock dispatch slow: fewer tokens there.
    gens = [max(6, args.hf_gen // 4) if "stock_dispatch" in name or name == stock_name
            else args.hf_gen for _, name, _, _ in variants]
    for (_, _, _, ctx), backend, gen in zip(variants, backends, gens):
        with ctx():
            backend.run(prompt, gen)                       # warm-up
    rounds: list[list[float]] = [[] for _ in variants]
    ttfts: list[list[float]] = [[] for _ in variants]
    for r in range(args.hf_rounds):
        order = list(range(len(variants)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            with variants[i][3]():
                ttft, steps = backends[i].run(prompt, gens[i])
            rounds[i].append(statistics.median(steps))
            ttfts[i].append(ttft)
    for i, (label, name, _, ctx) in enumerate(variants):
        with ctx():
            names = _kernel_names(lambda: backends[i].run(prompt, 3))
            prof = _top_ops(lambda: backends[i].run(prompt, 4), args.top) if args.kernels else []
        cudnn = sorted({n[:80] for n in names if "cudnn" in n.lower()})
        attn = sorted({n[:80] for n in names if any(s in n.lower() for s in
                                                     ("flash", "fmha", "attention"))})
        emit(dict(section="hf", model=label, variant=name, prompt_len=args.hf_prompt,
                  gen=gens[i], rounds=len(rounds[i]),
                  tpot_ms=1e3 * statistics.median(rounds[i]),
                  tpot_min_ms=1e3 * min(rounds[i]),
                  tpot_round_ms=[round(1e3 * t, 3) for t in rounds[i]],
                  ttft_ms=1e3 * statistics.median(ttfts[i]),
                  cudnn_kernels=len(cudnn), attention_kernels=attn[:6],
                  cudnn_examples=cudnn[:3], profile=prof))
    by = {(row_label, name): statistics.median(rounds[i])
          for i, (row_label, name, _, _) in enumerate(variants)}
    emit(dict(section="hf_ratio", pruned_over_dense_speed=by[("dense", "ours")] /
              by[("pruned", "ours")],
              ours_over_stock_speed=by[("dense", f"{stock_name}_no_cudnn")] /
              by[("dense", "ours")],
              per_round_pruned_speed=[round(d / p, 3) for d, p in
                                      zip(rounds[0], rounds[1])]))
    del dense, pruned, stock, variants, backends
    _free()


def _ttft(eng, n: int, vocab: int, seed: int) -> float:
    from ecospa_deploy.engine import SamplingParams

    prompt = _prompt(n, vocab, seed)
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.add(0, prompt, SamplingParams(max_new_tokens=1))
    dt = time.perf_counter() - t
    eng.free(0)
    return dt


def _variants(args):
    """(name, engine kwargs, patch) — patch restores the old prefill (cuDNN allowed, no pad)."""
    out = [("graphs", dict(prefill_graphs=True), None)]
    if args.baseline:
        out += [("eager_no_cudnn", dict(prefill_graphs=False), None),
                ("eager_cudnn_before", dict(prefill_graphs=False), "before")]
    return out


@contextlib.contextmanager
def _before(eng, patch):
    from ecospa_deploy.engine import engine as engine_mod

    if patch != "before":
        yield
        return
    saved = engine_mod._PREFILL_SDPA
    engine_mod._PREFILL_SDPA = engine_mod._DECODE_SDPA
    eng.forward.prefill_pad = False
    try:
        yield
    finally:
        engine_mod._PREFILL_SDPA = saved
        eng.forward.prefill_pad = True


def ttft_rows(shape, dtype, dev, args, emit) -> None:
    from ecospa_deploy.engine import Engine

    vocab = shape["dense"]["vocab_size"]
    for label in ("dense", "pruned"):
        model = build_model(shape, label == "pruned", dtype, dev)
        for name, kw, patch in _variants(args):
            eng = Engine(model, max_batch_size=1, max_seq_len=args.max_seq, device=dev,
                         dtype=dtype, compile=False, **kw)
            t = time.perf_counter()
            graphs = eng.warmup([1], max(NEW_LENGTHS))
            warm_s = time.perf_counter() - t
            with _before(eng, patch):
                _ttft(eng, 64, vocab, 0)                      # first call of all: lazy init
                for i, n in enumerate(NEW_LENGTHS):
                    first = _ttft(eng, n, vocab, 100 + i)
                    again = sorted(_ttft(eng, n, vocab, 200 + i + 7 * j) for j in range(5))
                    emit(dict(section="ttft", model=label, variant=name, prompt_len=n,
                              first_ms=1e3 * first, repeat_min_ms=1e3 * again[0],
                              repeat_median_ms=1e3 * again[2], warmup_s=warm_s,
                              warmup_graphs=graphs))
            del eng
            _free()
        del model
        _free()


def prefill_rows(shape, dtype, dev, args, ceil, emit) -> None:
    from ecospa_deploy.engine import Engine, SamplingParams

    vocab = shape["dense"]["vocab_size"]
    cases = [tuple(map(int, c.split("x"))) for c in args.prefill]
    for label in ("dense", "pruned"):
        model = build_model(shape, label == "pruned", dtype, dev)
        facts = model_facts(model, dtype)
        for name, kw, patch in _variants(args):
            if patch == "before" and not args.baseline_prefill:
                continue
            eng = Engine(model, max_batch_size=max(b for b, _ in cases),
                         max_seq_len=max(t for _, t in cases) + 64, device=dev, dtype=dtype,
                         compile=False, **kw)
            with _before(eng, patch):
                for b, t in cases:
                    prompts = [_prompt(t, vocab, 300 + r) for r in range(b)]
                    slots = list(range(b))
                    for s in slots:
                        eng._set_params(s, SamplingParams())
                    eng._prefill_rows(slots, prompts)         # capture / warm
                    times = []
                    for _ in range(args.iters):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        eng._prefill_rows(slots, prompts)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    times.sort()
                    flops = prefill_flops(facts["spec"], facts["matmul_params"], b, t)
                    floor = prefill_floor_s(flops, ceil)
                    med = times[len(times) // 2]
                    emit(dict(section="prefill", model=label, variant=name, batch=b,
                              prompt_len=t, min_ms=1e3 * times[0], median_ms=1e3 * med,
                              floor_ms=1e3 * floor, pct_floor=100 * floor / med, flops=flops))
            del eng
            _free()
        del model
        _free()


def decode_rows(shape, dtype, dev, args, ceil, emit) -> None:
    from ecospa_deploy.engine import Engine

    from .profile_decode import step_time, top_kernels

    cases = [tuple(map(int, c.split("x"))) for c in args.decode]
    for label in ("dense", "pruned"):
        model = build_model(shape, label == "pruned", dtype, dev)
        facts = model_facts(model, dtype)
        eng = Engine(model, max_batch_size=max(b for b, _ in cases),
                     max_seq_len=max(c for _, c in cases) + 128, device=dev, dtype=dtype,
                     compile=True)
        del model
        _free()
        for b, c in cases:
            t = step_time(eng, b, c)
            floor = decode_floor_s(facts["decode_read_bytes"], facts["kv_bytes_per_token"], b,
                                   c, ceil)
            kernels = top_kernels(eng, b, c, n=args.top) if args.kernels else []
            emit(dict(section="decode", model=label, batch=b, context=c, ms=1e3 * t,
                      floor_ms=1e3 * floor, pct_floor=100 * floor / t,
                      kernels=[dict(name=k[0], us=round(k[1] * 1e3, 1), count=k[2])
                               for k in kernels]))
        del eng
        _free()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--sections", default="hf,ttft,prefill,decode")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--baseline-prefill", action="store_true",
                    help="also the before-the-fix prefill (slow: a cuDNN build per shape)")
    ap.add_argument("--hf-prompt", type=int, default=128)
    ap.add_argument("--hf-gen", type=int, default=32)
    ap.add_argument("--hf-rounds", type=int, default=5)
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--prefill", nargs="+", default=["1x128", "1x2048", "32x128"])
    ap.add_argument("--decode", nargs="+", default=["1x128", "32x128", "32x2048"])
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ceil = measure_ceilings(dev, dtype)
    shape = load_shape(args.shape)
    out: dict[str, Any] = dict(shape=args.shape, argv=argv, ceilings=ceil.to_dict(),
                               torch=torch.__version__, rows=[])

    def emit(row):
        out["rows"].append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                          for k, v in row.items() if k != "kernels"}), flush=True)
        for k in row.get("kernels", []):
            print(f"    {k['us']:8.1f} us x{k['count']:<4d} {k['name']}", flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    sections = args.sections.split(",")
    for name, fn in (("hf", lambda: hf_rows(shape, dtype, dev, args, emit)),
                     ("ttft", lambda: ttft_rows(shape, dtype, dev, args, emit)),
                     ("prefill", lambda: prefill_rows(shape, dtype, dev, args, ceil, emit)),
                     ("decode", lambda: decode_rows(shape, dtype, dev, args, ceil, emit))):
        if name in sections:
            t = time.perf_counter()
            fn()
            print(f"# section {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
