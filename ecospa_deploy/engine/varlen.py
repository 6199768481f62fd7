"""Causal attention over packed sequences: prompts laid end to end, no padding rows.

A batch of prompts prefilled together used to run as rows padded to the longest one (and to a
captured bucket): 1.28x the real prompt tokens on the server's 64-prompt burst
(bench/results/serve_h200/prefill_plan). Packed, every linear layer sees only real tokens and
attention keeps each prompt to itself through cumulative offsets ``cu [n+1]``: token ``t`` of
sequence ``s`` (``cu[s] <= t < cu[s+1]``) attends to ``cu[s]..t``.

On CUDA in half precision this is PyTorch's flash-attention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``; grouped KV heads go in as they are where it takes
``enable_gqa``, repeated where it does not). Elsewhere ``reference_varlen`` runs one SDPA per sequence
(host offsets, not capturable): the CPU path and the tests' ground truth.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


_FOUND: list = []     # filled once, by ``available`` before anything is compiled


def _kernel():
    """``(varlen_attn, its keyword names)``, or None where this torch has no varlen API.

    Cached in a plain list, not ``functools.cache``: ``varlen_causal`` runs under
    ``torch.compile``, and Dynamo traces through a cache wrapper (with a warning)."""
    if not _FOUND:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _FOUND.append(None)
        else:
            _FOUND.append((varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)))
    return _FOUND[0]


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the flash varlen kernel runs here: CUDA, fp16/bf16, and a torch whose
    ``varlen_attn`` takes a softmax scale and a causal window (2.11 on; 2.10's took neither,
    so the engine keeps its padded rows there)."""
    kernel = _kernel()
    return (device.type == "cuda" and dtype in HALF and kernel is not None
            and {"scale", "window_size"} <= kernel[1])


def head_dims_fit(dims: Sequence[int]) -> bool:
    """Whether flash takes every layer's (padded, q/k = v) head dim: a multiple of 8 up to
    256 (the engine pads to multiples of ``head_multiple``, 8 by default)."""
    return all(d % 8 == 0 and 0 < d <= 256 for d in dims)


def kernel_kwargs(params: frozenset, window: int | None, scale: float, gqa: bool) -> dict:
    """Keywords for the installed ``varlen_attn`` (``params``: its parameter names): causal,
    a sliding ``window`` (keys ``window`` or more positions back are masked), the softmax
    ``scale``, and grouped KV heads where it takes them (else the caller repeats KV heads)."""
    kw = {"window_size": (-1 if window is None else window - 1, 0), "scale": scale}
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                  max_len: int, scale: float, window: int | None = None) -> torch.Tensor:
    """``q [T, H, d]``, ``k``/``v [T, Hkv, d]`` packed by ``cu [n+1]`` (int32, on the device;
    zero-length sequences allowed) -> ``[T, H, d]``. ``max_len`` bounds every sequence's
    length (a graph captures it once: ``packing.packed_max_len``). No host sync."""
    fn, params = _kernel()
    gqa = k.shape[1] != q.shape[1]
    kw = kernel_kwargs(params, window, scale, gqa)
    if gqa and "enable_gqa" not in kw:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                     scale: float, window: int | None = None) -> torch.Tensor:
    """``varlen_causal`` as one SDPA per sequence of host ``lengths`` (summing to ``T``)."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
        mask = None
        if window is not None:
            d = torch.arange(n, device=q.device)
            d = d[:, None] - d[None, :]
            mask = (d >= 0) & (d < window)
        out.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1))
        start += n
    return torch.cat(out) if out else q.new_zeros(0, q.shape[1], v.shape[-1])
