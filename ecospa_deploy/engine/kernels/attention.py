"""Decode attention over the engine's per-layer KV cache: one query token per row.

Why a kernel of our own: a pruned layer's K is stored at its own q/k head dim (e.g. 24) and V at
its v head dim (e.g. 40), and each row of a decode batch has its own length. Library kernels
either refuse q/k dim != v dim (flash), pay a fixed ~6 us per call at short contexts (cuDNN,
bench/results/ENGINE_RUNS.md), or need a mask tensor over the padded bucket. This kernel reads
exactly ``positions[b] + 1`` cached tokens (or the sliding window) of each row at the stored
dims, one program per (row, KV head, split) handling the KV head's whole query group (padded to the
16 rows of an MMA: the kernel waits on memory, not on the tensor cores), with an online softmax
in fp32; long contexts at small batch are split across programs and combined by
a second tiny kernel (flash-decoding).
"""

from __future__ import annotations

import functools
import math

import torch

from ecospa_deploy.padding import round_up

from .runtime import interpreting, quick_bench, triton, tl, tuning

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
            q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_o_ptr, part_ml_ptr,
            scale_log2, window, num_heads, kv_heads, max_seq, split_len, stride_qm, stride_om,
            kv_log2,
            G: tl.constexpr, QK: tl.constexpr, VD: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_WINDOW: tl.constexpr,
            SPLITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        end = tl.load(pos_ptr + b) + 1
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(end - window, 0)
        start = tl.maximum(sp * split_len, lo)
        stop = tl.minimum((sp + 1) * split_len, end)

        g = tl.arange(0, BLOCK_G)
        dq = tl.arange(0, BLOCK_QK)
        dv = tl.arange(0, BLOCK_V)
        g_ok = g < G
        dq_ok = dq < QK
        dv_ok = dv < VD
        heads = kvh * G + g
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qm + heads[:, None] * QK + dq[None, :],
                    mask=g_ok[:, None] & dq_ok[None, :], other=0.0).to(tl.float32)
        q = q * scale_log2
        base = (b.to(tl.int64) * kv_heads + kvh) * max_seq

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_V], tl.float32)
        q = q.to(kc_ptr.dtype.element_ty)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < stop
            k = tl.load(kc_ptr + (base + s)[:, None] * QK + dq[None, :],
                        mask=s_ok[:, None] & dq_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)        # [G, S]
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(vc_ptr + (base + s)[:, None] * VD + dv[None, :],
                        mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        if SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(out_ptr + b.to(tl.int64) * stride_om + heads[:, None] * VD + dv[None, :],
                     o, mask=g_ok[:, None] & dv_ok[None, :])
        else:
            part = (b.to(tl.int64) * num_heads + heads) * SPLITS + sp
            tl.store(part_o_ptr + part[:, None] * VD + dv[None, :], acc,
                     mask=g_ok[:, None] & dv_ok[None, :])
            tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)

    @triton.jit
    def _combine_kernel(part_o_ptr, part_ml_ptr, out_ptr, num_heads, stride_om,
                        VD: tl.constexpr, BLOCK_V: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        dv = tl.arange(0, BLOCK_V)
        part = (b.to(tl.int64) * num_heads + h) * SPLITS + sp
        m = tl.load(part_ml_ptr + part * 2)
        l_ = tl.load(part_ml_ptr + part * 2 + 1)
        w = tl.exp2(m - tl.max(m, 0))          # empty splits: exp2(-inf) = 0
        o = tl.load(part_o_ptr + part[:, None] * VD + dv[None, :], mask=(dv < VD)[None, :],
                    other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(l_ * w, 0)
        tl.store(out_ptr + b.to(tl.int64) * stride_om + h * VD + dv, out, mask=dv < VD)


def _configs():
    return [triton.Config({"BLOCK_S": bs}, num_warps=4, num_stages=st)
            for bs, st in ((64, 2), (32, 2), (128, 2), (64, 3), (32, 3))]


@functools.cache
def _tuned():
    key = ["G", "QK", "VD", "kv_heads", "SPLITS", "kv_log2", "HAS_WINDOW"]
    configs = _configs() if tuning() else _configs()[:1]
    return triton.autotune(configs, key=key, do_bench=quick_bench)(_decode_attention_kernel)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(programs: int, kv_len: int, device: torch.device) -> int:
    """Splits of the context per (row, KV head): about two waves of programs, >= 64 tokens each."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = min(-(-2 * sms // programs), kv_len // 64, 64)
    return 1 << max(0, int(math.log2(max(want, 1))))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, *, num_heads: int, scale: float,
                     window: int | None, kv_len: int, splits: int | None = None
                     ) -> torch.Tensor:
    """``q [M, H*qk]`` against cache rows ``[:M]`` up to ``positions[m]``; returns ``[M, H*v]``.

    ``k_cache [B, Hkv, S, qk]``, ``v_cache [B, Hkv, S, v]``; ``kv_len``: the bucket bounding
    every ``positions[m] + 1`` (sizes the splits, keys the tuning); ``splits`` overrides the
    split count (a power of two; tests).
    """
    m = q.shape[0]
    kv_heads, max_seq, qk = k_cache.shape[1:]
    vd = v_cache.shape[3]
    g = num_heads // kv_heads
    out = torch.empty(m, num_heads * vd, device=q.device, dtype=q.dtype)
    splits = splits or num_splits(m * kv_heads, kv_len, q.device)
    split_len = -(-kv_len // splits) if splits > 1 else max_seq
    split_len = round_up(split_len, 64)
    if splits > 1:
        part_o = torch.empty(m * num_heads * splits, vd, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(m * num_heads * splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out
    np2 = triton.next_power_of_2
    args = (q, k_cache, v_cache, positions, out, part_o, part_ml, scale * math.log2(math.e),
            window or 0, num_heads, kv_heads, max_seq, split_len, q.stride(0), out.stride(0),
            max(kv_len, 1).bit_length())
    flags = dict(G=g, QK=qk, VD=vd, BLOCK_G=max(16, np2(g)), BLOCK_QK=max(16, np2(qk)),
                 BLOCK_V=max(16, np2(vd)), HAS_WINDOW=window is not None, SPLITS=splits,
                 PRECISION="ieee" if q.dtype == torch.float32 else None)
    grid = (m, kv_heads, splits)
    if interpreting():
        _decode_attention_kernel[grid](*args, **flags, BLOCK_S=16)
    else:
        _tuned()[grid](*args, **flags)
    if splits > 1:
        _combine_kernel[(m, num_heads)](part_o, part_ml, out, num_heads, out.stride(0), VD=vd,
                                        BLOCK_V=np2(vd), SPLITS=splits)
    return out


@torch.library.custom_op("ecospa::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        positions: torch.Tensor, num_heads: int, scale: float,
                        window: int | None, kv_len: int) -> torch.Tensor:
    """``decode_attention`` as an opaque op, so the compiled PyTorch decode step (batches above
    the fused step's) can call it: Dynamo does not trace into the launcher, and Inductor keeps
    the cache writes before it in place."""
    return decode_attention(q.contiguous(), k_cache, v_cache, positions, num_heads=num_heads,
                            scale=scale, window=window, kv_len=kv_len)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, positions, num_heads, scale, window, kv_len):
    return q.new_empty(q.shape[0], num_heads * v_cache.shape[3])
