"""The host side of packed prefill: which prompts pack together, the captured token buckets,
and the packed inputs ``Forward.prefill_packed`` reads (tokens, positions, cache rows, offsets,
last-token indices).

A captured graph has fixed shapes, so a packed prefill of ``total`` tokens runs in the graph of
``packed_bucket(total)`` tokens and ``rows`` offsets: the padding tokens are a sequence of their
own (attending only to each other) whose K/V land in the last prompt's cache row after its end,
at positions decode overwrites before it reads them, and the offsets after it are zero-length
sequences.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from ecospa_deploy.padding import round_up


def _step(n: int) -> int:
    return max(128, (1 << max(n - 1, 1).bit_length()) // 16)


def packed_bucket(n: int) -> int:
    """Captured token count of a packed prefill of ``n`` tokens: multiples of
    max(128, 2^ceil(log2 n)/16) (< 12.5% extra; 16 buckets up to 2048, 8 more per doubling)."""
    return round_up(n, _step(n))


def packed_max_len(width: int, max_seq: int) -> int:
    """A bound on every packed sequence's length in a bucket of ``width`` tokens: a prompt has
    fewer than ``max_seq`` tokens and the padding fewer than the bucket's step. The attention
    kernel's grid grows with it (blocks of a short sequence exit at once, but each is
    scheduled), so a graph passes this and not the bucket."""
    return min(width, max(max_seq, _step(width)))


def packed_groups(lengths: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """Split prompts (in order) into packed prefills ``[start, end)`` of at most ``max_tokens``
    real tokens each (no row limit: nothing is padded per row); an over-long prompt alone."""
    out, start = [], 0
    while start < len(lengths):
        end, total = start + 1, lengths[start]
        while end < len(lengths) and total + lengths[end] <= max_tokens:
            total, end = total + lengths[end], end + 1
        out.append((start, end))
        start = end
    return out


def packed_inputs(slots: Sequence[int], prompts: Sequence[Sequence[int]], width: int,
                  rows: int, max_seq: int) -> tuple[torch.Tensor, ...]:
    """Host tensors ``(tokens, positions, cache_rows [width], cu [rows+1] int32, last
    [rows])`` of ``prompts`` (into cache ``slots``) packed to ``width >= sum of lengths``
    tokens and ``rows`` offsets: the prompts, then the padding as a sequence of its own (its
    K/V written into the last prompt's row past its end), then zero-length sequences."""
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    total, n = int(lens.sum()), len(prompts)
    pad = width - total
    if not (0 < n and n + bool(pad) <= rows and total <= width):
        raise ValueError(f"{n} prompts of {total} tokens do not fit {rows} rows of {width} "
                         "packed tokens")
    # numpy, not torch: host tensor ops of a few thousand elements run on torch's intra-op
    # pool, whose threads spin against the server's own (repeat_interleave: 8 ms on 2 busy
    # cores, 0.02 ms on one thread)
    tokens = np.zeros(width, dtype=np.int64)
    tokens[:total] = np.fromiter(itertools.chain.from_iterable(prompts), np.int64, total)
    spans = lens.copy()
    spans[-1] += pad                       # the padding continues the last prompt's row
    ends = np.cumsum(lens)
    starts = np.repeat(np.cumsum(spans) - spans, spans)
    positions = np.minimum(np.arange(width) - starts, max_seq - 1)
    cache_rows = np.repeat(np.asarray(slots, dtype=np.int64), spans)
    cu = np.full(rows + 1, width, dtype=np.int32)
    cu[0] = 0
    cu[1:n + 1] = ends
    last = np.zeros(rows, dtype=np.int64)
    last[:n] = ends - 1
    return tuple(torch.from_numpy(a) for a in (tokens, positions, cache_rows, cu, last))


def warmup_lengths(most: int, max_len: int) -> dict[int, list[int]]:
    """``{bucket: prompt lengths}`` for every packed bucket a prefill of at most ``most`` tokens
    (prompts of at most ``max_len``) can land in: lengths of at most ``max_len`` whose sum
    lands in that bucket, as few prompts as can be (``Engine.warmup`` captures each)."""
    out, width = {}, packed_bucket(1)
    while width <= packed_bucket(most):
        total = min(width, most)
        out[width] = [max_len] * (total // max_len) + [total % max_len] * bool(total % max_len)
        width = packed_bucket(width + 1)
    return out
