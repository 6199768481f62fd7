"""Bandwidth of each decode kernel against its PyTorch counterpart, per projection of a shape.

``python -m ecospa_deploy.bench.kernel_roofline --shape llama-1b --rows 1 32`` times, for the
dense and pruned layer 0..L-1 projections (qkv, o, gate|up, down, LM head) and decode attention,
the fused Triton kernel and ``F.linear`` / cuDNN SDPA on the same tensors, and prints achieved
TB/s (bytes of weight + activations, or KV cache, over time) next to the measured copy
bandwidth. Evidence for where a decode step loses time; not a unit test.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ecospa_deploy.benchmark.floor import measure_ceilings
from ecospa_deploy.benchmark.harness import shape_engines
from ecospa_deploy.benchmark.shapes import load_shape


def _time(fn) -> float:
    """Seconds per call, replayed from a CUDA graph (no host launch cost in the figure)."""
    import triton.testing

    from ecospa_deploy.engine.engine import _sdpa_context

    with _sdpa_context(torch.device("cuda")):
        fn()
        fn()                      # autotuning happens here, outside the capture
        return triton.testing.do_bench_cudagraph(fn, rep=30) / 1e3


def _linear_rows(eng, rows: int):
    from ecospa_deploy.engine.kernels.linear import (ACTIVATIONS, NORM_LAYER, NORM_RMS,
                                                     fused_linear)

    mw = eng.weights
    norm = dict(norm_kind=NORM_RMS if mw.rms_norm else NORM_LAYER, eps=mw.norm_eps)
    seen = set()
    for lw in mw.layers:
        for name, w, kw in (("qkv", lw.qkv_w, dict(norm=lw.norm1, **norm)),
                            ("o", lw.o_w, {}),
                            ("gate_up", lw.up_w, dict(norm=lw.norm2, **norm,
                                                      act=ACTIVATIONS[mw.act_name],
                                                      gated=mw.gated)),
                            ("down", lw.down_w, {})):
            if (name, tuple(w.shape)) in seen:
                continue
            seen.add((name, tuple(w.shape)))
            x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
            nbytes = w.numel() * w.element_size()
            yield name, tuple(w.shape), nbytes, (lambda: F.linear(x, w)), \
                (lambda: fused_linear(x, w, **kw))


def main(argv=None) -> int:
    from ecospa_deploy.engine.kernels.attention import decode_attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--which", default="dense,pruned")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ceil = measure_ceilings(dev, dtype)
    print(f"copy bandwidth {ceil.bandwidth / 1e12:.2f} TB/s")
    shape = load_shape(args.shape)
    out = []
    for which, eng, _ in shape_engines(shape, args.which.split(","), dtype, dev,
                                       max_batch_size=max(args.rows),
                                       max_seq_len=max(args.contexts) + 8, kernels=False):
        for rows in args.rows:
            for name, wshape, nbytes, ref, fused in _linear_rows(eng, rows):
                t_ref, t_fused = _time(ref), _time(fused)
                row = dict(model=which, rows=rows, op=name, shape=wshape,
                           torch_tbs=nbytes / t_ref / 1e12, fused_tbs=nbytes / t_fused / 1e12,
                           torch_us=t_ref * 1e6, fused_us=t_fused * 1e6)
                out.append(row)
                print(json.dumps(row))
            for ctx in args.contexts:
                for lw, kc, vc in list(zip(eng.weights.layers, eng.cache.k, eng.cache.v))[:3]:
                    pos = torch.full((rows,), ctx - 1, device=dev)
                    q = torch.randn(rows, lw.num_attention_heads * lw.qk_head_dim, device=dev, dtype=dtype)
                    nbytes = rows * ctx * (kc.shape[1] * (kc.shape[3] + vc.shape[3])) * 2
                    qs = q.view(rows, lw.num_attention_heads, 1, lw.qk_head_dim)

                    def ref():
                        return F.scaled_dot_product_attention(
                            qs, kc[:rows, :, :ctx], vc[:rows, :, :ctx], scale=lw.softmax_scale,
                            enable_gqa=lw.gqa)

                    def fused():
                        return decode_attention(q, kc, vc, pos, num_heads=lw.num_attention_heads,
                                                scale=lw.softmax_scale, window=None, kv_len=ctx)

                    t_ref, t_fused = _time(ref), _time(fused)
                    row = dict(model=which, rows=rows, op="attention", ctx=ctx,
                               dims=(lw.qk_head_dim, lw.v_head_dim), torch_tbs=nbytes / t_ref / 1e12,
                               fused_tbs=nbytes / t_fused / 1e12, torch_us=t_ref * 1e6,
                               fused_us=t_fused * 1e6)
                    out.append(row)
                    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=ceil.to_dict(), rows=out), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
