"""pytest-benchmark suites for layer-level kernels on CUDA: attention and FFN, dense vs pruned,
aligned vs not, at LLaMA-1B layer widths (bf16, 32 x 4096-token KV).

Run: ``pytest tests/test_kernel_bench.py --benchmark-only``. Each case times one decode step
(1 token) and one prefill chunk of the layer piece; the ids name the shape. Without CUDA the
module skips: CPU timings say nothing about the GPU kernels these shapes are for.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("pytest_benchmark")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
HIDDEN, CONTEXT, BATCH = 2048, 4096, 32

# FFN widths: LLaMA-1B dense (5461, unaligned as released), padded to 64, and a pruned width.
FFN = {"dense-5461": 5461, "dense-5504-aligned": 5504, "pruned-3517": 3517,
       "pruned-3520-aligned": 3520}
# (heads, q/k dim, v dim): dense, EcoSpa-like pruned q/k (K stored at the pruned dim), padded.
ATTN = {"dense-64-64": (32, 64, 64), "pruned-24-64": (32, 24, 64),
        "pruned-padded-64-64": (32, 64, 64), "pruned-16-56": (32, 16, 56)}
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sync():
    torch.cuda.synchronize()


@pytest.mark.parametrize("tokens", [1, 512], ids=["decode", "prefill"])
@pytest.mark.parametrize("name", list(FFN))
def test_ffn(benchmark, name, tokens):
    width = FFN[name]
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
    gate_up = torch.randn(2 * width, HIDDEN, device=DEVICE, dtype=DTYPE) * 0.02
    down = torch.randn(HIDDEN, width, device=DEVICE, dtype=DTYPE) * 0.02

    def ffn():
        h = F.linear(x, gate_up)
        y = F.linear(F.silu(h[:, :width]) * h[:, width:], down)
        _sync()
        return y

    out = benchmark(ffn)
    assert out.shape == (tokens, HIDDEN) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(ATTN))
def test_decode_attention(benchmark, name):
    heads, qk, v = ATTN[name]
    q = torch.randn(BATCH, heads, 1, qk, device=DEVICE, dtype=DTYPE)
    k = torch.randn(BATCH, heads, CONTEXT, qk, device=DEVICE, dtype=DTYPE)
    val = torch.randn(BATCH, heads, CONTEXT, v, device=DEVICE, dtype=DTYPE)
    mask = torch.ones(BATCH, 1, 1, CONTEXT, dtype=torch.bool, device=DEVICE)

    def attend():
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):   # a fresh one per call: single-use
            y = F.scaled_dot_product_attention(q, k, val, attn_mask=mask, scale=0.125)
        _sync()
        return y

    out = benchmark(attend)
    assert out.shape == (BATCH, heads, 1, v) and torch.isfinite(out).all()
