"""Fused decode linear: ``out = epilogue(norm(x) @ W.T + b)`` for a few rows of input.

Why: at decode batch sizes a linear layer reads its whole weight for a handful of rows, so its
time is weight bytes over bandwidth plus fixed costs. cuBLAS picks split-K GEMVs for some
widths (0.83 TB/s for a 2048x2048 o_proj, bench/results/ENGINE_RUNS.md) and every norm, RoPE,
activation and residual add around a matmul is one more launch whose fixed cost does not shrink
with the pruned widths. This kernel streams the weight once and folds the rest in:

- prologue: RMSNorm or LayerNorm of the input rows (the row is a few KiB, L2-resident; every
  program computes its statistics instead of launching a norm kernel);
- epilogue, one of: plain store; residual add; activation; gated activation of interleaved
  ``gate|up`` row pairs (writes half the columns); or the attention input step: RoPE of
  interleaved q/k pairs, q stored for attention, k and v written to the KV cache at each row's
  position.

One row (batch 1) streams the weight as a GEMV: per-thread FMAs into a tile, one reduction at
the end. More rows pad to a 16-row ``tl.dot`` (the wasted MMA work is free: the kernel waits on
memory). Block sizes are tuned per shape by ``triton.autotune`` on first use (done during
warm-up, before a CUDA graph is captured).
"""

from __future__ import annotations

import functools

import torch

from .runtime import interpreting, quick_bench, triton, tl, tuning

# Epilogues and norms (constexpr codes).
EPI_STORE, EPI_RESIDUAL, EPI_ACT, EPI_GATED, EPI_QKV = 0, 1, 2, 3, 4
NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ACT_NONE, ACT_SILU, ACT_GELU_TANH, ACT_GELU_ERF, ACT_RELU = 0, 1, 2, 3, 4

# HF activation names -> code (only functions the kernel computes exactly as HF does).
ACTIVATIONS = {"silu": ACT_SILU, "swish": ACT_SILU, "gelu_new": ACT_GELU_TANH,
               "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu": ACT_GELU_ERF, "relu": ACT_RELU}
MAX_ROWS = 64

if triton is not None:

    @triton.jit
    def _act(x, ACT: tl.constexpr):
        if ACT == 1:
            x = x * tl.sigmoid(x)
        elif ACT == 2:                     # 0.5 x (1 + tanh(u)) == x sigmoid(2u)
            x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        elif ACT == 3:
            x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACT == 4:
            x = tl.maximum(x, 0.0)
        return x

    @triton.jit
    def _row_sum(x_rows, m_ok, K, center, SQUARE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        """Per row of x: sum of (x - center), or of its square (LayerNorm statistics)."""
        total = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk[None, :] < K
            xk = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
            d = tl.where(k_ok, xk.to(tl.float32) - center[:, None], 0.0)
            if SQUARE:
                d = d * d
            total += tl.sum(d, 1)
        return total

    @triton.jit
    def _fused_linear_kernel(
            x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, nw_ptr, nb_ptr,
            pos_ptr, cos_ptr, sin_ptr, ridx_ptr, kc_ptr, vc_ptr,
            M, N, K, stride_xm, stride_rm, stride_om, eps,
            rope_stride, q_end, k_end, v_end, qk_head_dim, v_head_dim, kv_heads, max_seq,
            NORM: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROPE: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rk0 = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm

        # RMSNorm is folded into the main loop (sum of squares streamed alongside, the row
        # scale applied to the accumulator at the end): no dependent pre-pass before the
        # weight stream starts. LayerNorm needs the mean first: two short passes over x.
        mean = tl.zeros([BLOCK_M], tl.float32)
        rstd = tl.full([BLOCK_M], 1.0, tl.float32)
        sq = tl.zeros([BLOCK_M], tl.float32)
        if NORM == 2:
            mean = _row_sum(x_rows, m_ok, K, mean, False, BLOCK_M, BLOCK_K) / K
            rstd = 1.0 / tl.sqrt(_row_sum(x_rows, m_ok, K, mean, True, BLOCK_M, BLOCK_K) / K + eps)

        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:     # one row: per-thread FMAs into a 2-D tile, one cross-thread reduction at the end
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            xk = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            if NORM == 1:
                sq += tl.sum(xk * xk, 1)
                xk = xk * tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            elif NORM == 2:
                g = tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                xk = (xk - mean[:, None]) * rstd[:, None] * g[None, :]
                xk += tl.load(nb_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if EVEN_K:
                w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None], other=0.0)
            else:
                w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(xk.to(w.dtype), tl.trans(w), input_precision=PRECISION)
            else:
                acc2 += w.to(tl.float32) * xk
        if not USE_DOT:
            acc = tl.sum(acc2, 1)[None, :]
        if NORM == 1:
            acc = acc * (1.0 / tl.sqrt(sq / K + eps))[:, None]

        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        rm64 = rm.to(tl.int64)
        mask = m_ok[:, None] & n_ok[None, :]
        if EPI == 0:
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc, mask=mask)
        elif EPI == 1:
            res = tl.load(res_ptr + rm64[:, None] * stride_rm + rn[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc + res, mask=mask)
        elif EPI == 2:
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], _act(acc, ACT),
                     mask=mask)
        elif EPI == 3:
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            h = _act(gate, ACT) * up
            rh = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(out_ptr + rm64[:, None] * stride_om + rh[None, :], h,
                     mask=m_ok[:, None] & (rh[None, :] < N // 2))
        else:
            pos = tl.load(pos_ptr + rm, mask=m_ok, other=0).to(tl.int64)
            if ROPE:
                ridx = tl.load(ridx_ptr + rn, mask=n_ok, other=0)
                trig = pos[:, None] * rope_stride + ridx[None, :]
                c = tl.load(cos_ptr + trig, mask=mask, other=1.0).to(tl.float32)
                s = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
                a, b = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
                ce, _c = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_N // 2, 2)))
                se, _s = tl.split(tl.reshape(s, (BLOCK_M, BLOCK_N // 2, 2)))
                rot = tl.reshape(tl.join(a * ce - b * se, b * ce + a * se), (BLOCK_M, BLOCK_N))
                acc = tl.where((rn < k_end)[None, :], rot, acc)
            is_q = rn < q_end
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc,
                     mask=m_ok[:, None] & is_q[None, :])
            kr = rn - q_end
            is_k = (rn >= q_end) & (rn < k_end)
            k_off = ((rm64[:, None] * kv_heads + (kr // qk_head_dim)[None, :]) * max_seq
                     + pos[:, None]) * qk_head_dim + (kr % qk_head_dim)[None, :]
            tl.store(kc_ptr + k_off, acc, mask=m_ok[:, None] & is_k[None, :])
            vr = rn - k_end
            is_v = (rn >= k_end) & (rn < v_end)
            v_off = ((rm64[:, None] * kv_heads + (vr // v_head_dim)[None, :]) * max_seq
                     + pos[:, None]) * v_head_dim + (vr % v_head_dim)[None, :]
            tl.store(vc_ptr + v_off, acc, mask=m_ok[:, None] & is_v[None, :])


def _gemv_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((8, 256, 4, 3), (4, 512, 4, 3), (2, 1024, 4, 3),
                                  (16, 256, 4, 3), (8, 512, 8, 3), (16, 512, 8, 3),
                                  (32, 128, 4, 3), (4, 256, 2, 4))]


def _dot_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((32, 128, 4, 4), (16, 128, 4, 4), (16, 256, 4, 3),
                                  (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4))]


def _prune(configs, named_args, **kwargs):
    """Drop configs wider than N needs (one block of rows covers it)."""
    n = named_args["N"]
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))]
    return keep or configs[:1]


_KEY = ["M", "N", "K", "NORM", "EPI", "ACT", "HAS_BIAS", "ROPE", "BLOCK_M"]


@functools.cache
def _tuned(use_dot: bool):
    configs = _dot_configs() if use_dot else _gemv_configs()
    if not tuning():
        configs = configs[:1]
    even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                           do_bench=quick_bench)(even_k(_fused_linear_kernel))


def _row_block(m: int) -> tuple[int, bool]:
    """(BLOCK_M, use tl.dot): one row streams as a GEMV; more rows pad to a 16-row MMA."""
    if m == 1:
        return 1, False
    return min(MAX_ROWS, max(16, triton.next_power_of_2(m))), True


def _launch(x, w, out, *, bias=None, residual=None, norm=None, norm_kind=NORM_NONE, eps=0.0,
            epi=EPI_STORE, act=ACT_NONE, n_out=None, qkv=None) -> None:
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fused linear got {m} rows; expected <= {MAX_ROWS} (decode batches)")
    if x.stride(1) != 1 or w.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("fused linear needs a row-major input and a contiguous weight")
    bm, use_dot = _row_block(m)
    dummy = w
    nw, nb = (norm if norm is not None else (dummy, None))
    q = qkv or {}
    args = (x, w, bias if bias is not None else dummy,
            residual if residual is not None else dummy, out, nw,
            nb if nb is not None else dummy,
            q.get("pos", dummy), q.get("cos", dummy), q.get("sin", dummy), q.get("ridx", dummy),
            q.get("k_cache", dummy), q.get("v_cache", dummy),
            m, n, k, x.stride(0), residual.stride(0) if residual is not None else 0,
            out.stride(0), float(eps), q.get("rope_stride", 0), q.get("q_end", 0),
            q.get("k_end", 0), q.get("v_end", 0), q.get("qk_head_dim", 1),
            q.get("v_head_dim", 1),
            q.get("kv_heads", 1), q.get("max_seq", 1))
    flags = dict(NORM=norm_kind, EPI=epi, ACT=act, HAS_BIAS=bias is not None,
                 ROPE="ridx" in q, BLOCK_M=bm, USE_DOT=use_dot,
                 PRECISION="ieee" if w.dtype == torch.float32 else None)
    if interpreting():
        bn = 16 if use_dot else 8
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
        _fused_linear_kernel[grid](*args, **flags, BLOCK_N=bn, BLOCK_K=32, EVEN_K=k % 32 == 0)
        return
    kernel = _tuned(use_dot)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
    kernel[grid](*args, **flags)


def fused_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 norm_kind: int = NORM_NONE, eps: float = 0.0,
                 residual: torch.Tensor | None = None, act: int = ACT_NONE,
                 gated: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[M, K] -> [M, N]`` (``N/2`` when ``gated``): see the module docstring.

    ``norm``: (weight, bias) applied to ``x`` first (``norm_kind`` RMS or LayerNorm, ``eps``);
    ``residual``: added to the output; ``act``: activation code, applied to every output or,
    with ``gated``, to the even rows of each interleaved (gate, up) pair times the odd row.
    """
    m = x.shape[0]
    n = w.shape[0]
    if gated and n % 2:
        raise ValueError(f"gated linear needs an even number of rows; got {n}")
    out = torch.empty(m, n // 2 if gated else n, device=x.device, dtype=out_dtype or x.dtype)
    epi = EPI_GATED if gated else EPI_RESIDUAL if residual is not None else \
        EPI_ACT if act != ACT_NONE else EPI_STORE
    if residual is not None and (gated or act != ACT_NONE):
        raise ValueError("fused linear takes a residual or an activation, not both")
    _launch(x, w, out, bias=bias, residual=residual, norm=norm, norm_kind=norm_kind, eps=eps,
            epi=epi, act=act)
    return out


def fused_qkv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *,
              norm: tuple[torch.Tensor, torch.Tensor | None], norm_kind: int, eps: float,
              num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
              positions: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Attention input of one decode step: returns q ``[M, H*qk_head_dim]`` (RoPE applied) and
    writes this step's k (RoPE applied) and v into row ``m`` of the caches at ``positions[m]``.

    ``k_cache [B, Hkv, S, qk_head_dim]`` and ``v_cache [B, Hkv, S, v_head_dim]`` give the KV
    heads and head dims; the weight's rows are q (``num_heads`` heads), then k, then v.

    The weight's q and k rows hold each head's rotary pairs interleaved (``2p, 2p+1``), and
    ``rope = (cos [S, D], sin [S, D], ridx [rows])`` gives each row's column in the tables.
    """
    m = x.shape[0]
    kv_heads, max_seq, qk_head_dim = k_cache.shape[1:]
    v_head_dim = v_cache.shape[3]
    q_end = num_heads * qk_head_dim
    k_end = q_end + kv_heads * qk_head_dim
    out = torch.empty(m, q_end, device=x.device, dtype=x.dtype)
    qkv = dict(pos=positions, k_cache=k_cache, v_cache=v_cache, q_end=q_end, k_end=k_end,
               v_end=k_end + kv_heads * v_head_dim, qk_head_dim=qk_head_dim,
               v_head_dim=v_head_dim, kv_heads=kv_heads, max_seq=max_seq)
    if rope is not None:
        cos, sin, ridx = rope
        qkv.update(cos=cos, sin=sin, ridx=ridx, rope_stride=cos.stride(0))
    _launch(x, w, out, bias=bias, norm=norm, norm_kind=norm_kind, eps=eps, epi=EPI_QKV,
            qkv=qkv)
    return out
