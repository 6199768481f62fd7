"""Attention of a pruned layer on CUDA: padding q/k (or v) for flash vs the memory-efficient
kernel at the pruned dims, per layer shape of a twin and per query length.

``python -m ecospa_deploy.bench.sdpa_pad --shape llama-1b --json OUT.json`` (CUDA only). For each
distinct (heads, kv heads, q/k dim, v dim) of the twin and each ``QxK`` (query rows x keys) it
times both ways back to back: ``gpu_us`` from CUDA events around ``--iters`` calls (kernel time),
``wall_us`` from the host clock of the same loop (what a launch-bound caller pays, e.g. plain
``generate`` at batch 1) and the kernel launches of one call. This is the evidence the
choice of ``modeling.attention.PAD_MIN_QUERY_LEN`` waits for; ``gqa_efficient`` says whether the
memory-efficient kernel takes ``enable_gqa`` on this build.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ecospa_deploy.modeling.attention import pad_for_flash

from ecospa_deploy.benchmark.shapes import load_shape


def _padded(q, k, v):
    """Our HF modules' path: ``pad_for_flash``, flash, the output sliced back to the v dim."""
    causal = q.shape[-2] > 1
    q, k, v, v_dim = pad_for_flash(q, k, v)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out if v_dim is None else out[..., :v_dim].contiguous()


def _efficient(q, k, v):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1)


def _launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _time(fn, iters: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / iters
    return 1e3 * start.elapsed_time(end) / iters, 1e6 * wall


def gqa_efficient(dtype) -> bool:
    q = torch.randn(1, 4, 1, 32, device="cuda", dtype=dtype)
    kv = torch.randn(1, 2, 8, 32, device="cuda", dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--lengths", nargs="+", default=["1x160", "1x2048", "128x128", "2048x2048"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    shape = load_shape(args.shape)
    layers = shape["pruned"]["layers"]
    q_heads = [d["num_attention_heads"] for d in layers]
    dims = sorted({(h, d.get("num_key_value_heads", h), d["qk_head_dim"], d["v_head_dim"])
                   for h, d in zip(q_heads, layers)})
    out = dict(shape=args.shape, torch=torch.__version__, device=torch.cuda.get_device_name(),
               gqa_efficient=gqa_efficient(dtype), rows=[])
    for heads, kv, qk, vd in dims:
        if qk == vd:
            continue
        for spec in args.lengths:
            tq, tk = (int(x) for x in spec.split("x"))
            q = torch.randn(1, heads, tq, qk, device="cuda", dtype=dtype)
            k = torch.randn(1, kv, tk, qk, device="cuda", dtype=dtype)
            v = torch.randn(1, kv, tk, vd, device="cuda", dtype=dtype)
            torch.testing.assert_close(_padded(q, k, v), _efficient(q, k, v), rtol=2e-2, atol=2e-2)
            row = dict(heads=heads, kv_heads=kv, qk_head_dim=qk, v_head_dim=vd, q_len=tq, k_len=tk)
            for name, fn in (("padded_flash", _padded), ("efficient", _efficient)):
                gpu, wall = _time(lambda: fn(q, k, v), args.iters)
                row[name] = dict(gpu_us=round(gpu, 2), wall_us=round(wall, 2),
                                 launches=_launches(lambda: fn(q, k, v)))
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
