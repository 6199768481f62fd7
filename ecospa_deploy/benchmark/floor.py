"""The physical floor: measured device ceilings and the bytes/FLOPs a step must move/compute.

Decode is bound by memory: a step reads every weight it uses once plus each sequence's KV
cache, so ``floor = (weight bytes read + KV bytes read) / measured bandwidth``. The input
embedding (and GPT-2's position table) is not read whole: a step gathers one row per sequence,
so an untied embedding table does not count (a tied one is read whole as the LM head). Prefill is bound by arithmetic:
``floor = 2 * params * tokens + attention FLOPs`` over the measured matmul rate. Both ceilings
are measured on the device (a large device-to-device copy, a large GEMM), not taken from a
datasheet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ecospa_deploy.spec import ModelSpec


@dataclass(frozen=True)
class Ceilings:
    bandwidth: float          # bytes/s, counting bytes read plus bytes written
    matmul: float             # FLOP/s of a large GEMM in the benchmark dtype
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _time(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU), after a warm-up."""
    import time

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def measure_ceilings(device: torch.device, dtype: torch.dtype, small: bool = False) -> Ceilings:
    """Copy bandwidth and GEMM rate on ``device`` (``small``: tiny sizes for CPU tests)."""
    n_bytes = (64 << 20) if small or device.type == "cpu" else (2 << 30)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), 5 if small else 20, device)
    bandwidth = 2 * n_bytes / t
    del src, dst
    n = 512 if small or device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, 3 if small else 20, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(bandwidth=bandwidth, matmul=2 * n ** 3 / t, device=name)


def model_params(spec: ModelSpec, vocab: int, tied: bool, positions: int = 0) -> int:
    """Parameters from the spec (unpadded; what the checkpoint stores)."""
    h = spec.hidden_size
    total = sum(spec.layer_params(layer) for layer in spec.layers)
    return total + vocab * h * (1 if tied else 2) + positions * h + spec.norm_params


def kv_bytes_per_token(spec: ModelSpec, element_size: int) -> int:
    """KV bytes per token with K at the pruned q/k dim (unpadded)."""
    return sum(layer.kv_cache_width for layer in spec.layers) * element_size


def decode_read_bytes(weight_bytes: int, vocab: int, hidden: int, tied: bool, positions: int,
                      element_size: int) -> int:
    """Weight bytes one decode step reads: all but the gathered embedding tables."""
    skip = (0 if tied else vocab * hidden) + positions * hidden
    return weight_bytes - skip * element_size


def decode_floor_s(read_bytes: int, kv_per_token: int, batch: int, context: float,
                   ceilings: Ceilings) -> float:
    """Seconds per decode step: read the weights once and ``batch`` KV caches of ``context``."""
    return (read_bytes + kv_per_token * batch * context) / ceilings.bandwidth


def prefill_flops(spec: ModelSpec, params_no_embed: int, batch: int, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill: 2·params·tokens plus QK^T and PV over the causal half."""
    attn = sum(layer.num_attention_heads * (layer.qk_head_dim + layer.v_head_dim)
               for layer in spec.layers)
    return batch * (2.0 * params_no_embed * tokens + 2.0 * attn * tokens * tokens / 2)


def prefill_floor_s(flops: float, ceilings: Ceilings) -> float:
    return flops / ceilings.matmul


def burst_ttft_floor_s(spec: ModelSpec, params_no_embed: int, lengths: list[int],
                       matmul_flops_per_s: float) -> list[float]:
    """TTFT floor of each prompt of a burst that arrives at once, in the order that minimises
    every percentile (shortest first): the prefill FLOPs of it and of every shorter prompt at the
    matmul ceiling. No server can beat this for the burst, whatever it batches."""
    done, out = 0.0, {}
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        done += prefill_flops(spec, params_no_embed, 1, lengths[i])
        out[i] = done / matmul_flops_per_s
    return [out[i] for i in range(len(lengths))]


__all__ = ["Ceilings", "burst_ttft_floor_s", "measure_ceilings", "model_params",
           "kv_bytes_per_token", "decode_read_bytes", "decode_floor_s", "prefill_flops", "prefill_floor_s"]
