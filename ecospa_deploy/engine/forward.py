"""The engine's forward passes over ``ModelWeights``: batched prefill and one decode step.

Plain tensor code with no host syncs and no data-dependent Python control flow, so the decode
step can be captured as one CUDA graph and compiled with ``fullgraph=True``. Everything that
changes per step (tokens, positions, sampling parameters) lives in static device buffers owned
by the caller; the KV length attended to is a Python int (a bucket), so each captured graph
reads only the cache it needs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ecospa_deploy.modeling.attention import pad_last

from . import varlen
from .cache import KVCache
from .kernels.attention import decode_attention_op
from .sampling import sample_tokens
from .weights import LayerWeights, ModelWeights


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotation in the engine's interleaved layout, pair ``(2p, 2p+1)`` ->
    ``(x[2p] c - x[2p+1] s, x[2p+1] c + x[2p] s)``, as ``x * cos + swap_pairs(x) * signed_sin``
    (``signed_sin`` is ``-s`` at even dims): three kernels."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _one_head_dim(lw: LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``q``, ``k``, ``v`` with q/k (or v) zero-padded to one head dim, as flash attention
    wants: zero dims add nothing to q.k, and the caller slices the padded v columns off."""
    d = max(lw.qk_head_dim, lw.v_head_dim)
    if lw.qk_head_dim < d:
        return pad_last(q, d), pad_last(k, d), v
    if lw.v_head_dim < d:
        return q, k, pad_last(v, d)
    return q, k, v


class Forward:
    """Prefill and decode for one model; holds weights, RoPE tables and the KV cache."""

    def __init__(self, weights: ModelWeights, cache: KVCache, dtype: torch.dtype,
                 device: torch.device):
        self.w = weights
        self.cache = cache
        self.dtype, self.device = dtype, device
        self.cos = self.sin = None
        # Decode attention on the Triton kernel (each row's own length, K read at the stored
        # q/k dim) instead of SDPA over the masked bucket; the engine sets it where Triton runs.
        self.kernel_attention = False
        # Prefill pads q/k (or v) to one head dim so flash attention runs (it refuses q/k dim !=
        # v dim); zero dims add nothing to q.k and padded v columns are sliced off. Exact.
        self.prefill_pad = device.type == "cuda"
        if weights.rotary is not None:
            self._rope_tables(cache.max_seq)

    # -- RoPE -----------------------------------------------------------------------------
    @torch.no_grad()
    def _rope_tables(self, max_seq: int) -> None:
        """Dense cos/sin ``[max_seq, rope_head_dim]`` from HF's rotary module (scalings included)."""
        rotary = self.w.rotary
        _check_static_rope(rotary, max_seq)
        ref = next(iter(rotary.buffers()))
        pos = torch.arange(max_seq, device=ref.device)[None]
        x = torch.zeros(1, dtype=self.dtype, device=ref.device)
        cos, sin = rotary(x, pos)
        self.cos = cos[0].to(self.device, self.dtype).contiguous()
        self.sin = sin[0].to(self.device, self.dtype).contiguous()
        # [max_seq, 2D]: cos, then sin negated in its first half (the dims interleaving puts
        # at even positions), so one gather per layer brings both and no negation is needed.
        half = self.cos.shape[-1] // 2
        self.table = torch.cat((self.cos, -self.sin[:, :half], self.sin[:, half:]), -1)
        self.rope_index = [None if lw.k_rope is None else
                           torch.cat((lw.k_rope, lw.k_rope + self.cos.shape[-1]), -1)
                           for lw in self.w.layers]

    def _rope(self, i: int, lw: LayerWeights, q: torch.Tensor, k: torch.Tensor,
              table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [B,H,T,d]``, ``k [B,Hkv,T,d]`` with ``table [B,T,2D]`` rows (cos | signed
        sin at the dense head dim): one gather per layer; the query heads of a KV group
        broadcast its cos/sin (``q`` viewed ``[B, Hkv, groups, T, d]``) instead of gathering."""
        index = self.rope_index[i]
        if lw.rope_shared:
            cos, sin = table[..., index[0]][:, None].chunk(2, dim=-1)      # [B, 1, T, d]
            return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        cos, sin = table[:, :, index].transpose(1, 2).chunk(2, dim=-1)    # [B, Hkv, T, d]
        k = _rotate_pairs(k, cos, sin)
        b, h, t, d = q.shape
        groups = h // k.shape[1]
        if groups == 1:
            return _rotate_pairs(q, cos, sin), k
        q = _rotate_pairs(q.view(b, h // groups, groups, t, d), cos[:, :, None], sin[:, :, None])
        return q.view(b, h, t, d), k

    # -- pieces ---------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if self.w.rms_norm:     # HF's RMSNorm (fp32 statistics), in one fused op where torch has it
            h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.w.norm_eps)
            return weight * h.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.w.norm_eps)

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor, divisor: int) -> torch.Tensor:
        """Per-head RMSNorm of ``x [B, heads, T, d]`` dividing by the dense head dim (Qwen3's
        q/k norm; zero-padded dims add nothing to the sum)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / divisor + self.w.norm_eps)
        return weight * h.to(x.dtype)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.w.embed)
        if self.w.pos_embed is not None:
            x = x + F.embedding(positions, self.w.pos_embed)
        return x

    def _qkv(self, lw: LayerWeights, x: torch.Tensor):
        b, t = x.shape[:2]
        qkv = F.linear(x, lw.qkv_w, lw.qkv_b)
        heads, kv_heads, qk, vd = lw.num_attention_heads, lw.num_key_value_heads, lw.qk_head_dim, lw.v_head_dim
        q_end = heads * qk                            # rows: q | k | v | alignment padding
        k_end = q_end + kv_heads * qk
        q = qkv[..., :q_end].view(b, t, heads, qk).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, t, kv_heads, qk).transpose(1, 2)
        v = qkv[..., k_end:k_end + kv_heads * vd].view(b, t, kv_heads, vd).transpose(1, 2)
        return q, k, v

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, lw.up_w, lw.up_b)
        if self.w.gated:                                        # rows interleave gate_i, up_i
            h = h.unflatten(-1, (lw.intermediate_size, 2))
            h = self.w.act(h[..., 0]) * h[..., 1]
        else:
            h = self.w.act(h)
        return F.linear(h, lw.down_w, lw.down_b)

    def _layer(self, i: int, lw: LayerWeights, x: torch.Tensor, table, attend) -> torch.Tensor:
        q, k, v = self._qkv(lw, self._norm(x, *lw.norm1))
        if lw.k_norm is not None:
            q = self._head_norm(q, lw.q_norm, lw.qk_norm_divisor)
            k = self._head_norm(k, lw.k_norm, lw.qk_norm_divisor)
        if table is not None:
            q, k = self._rope(i, lw, q, k, table)
        out = attend(i, lw, q, k, v)                            # [B, H, T, v]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, lw.num_attention_heads * lw.v_head_dim)
        x = x + F.linear(out, lw.o_w, lw.o_b)
        return x + self._mlp(lw, self._norm(x, *lw.norm2))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(h, *self.w.final_norm), self.w.lm_head).float()

    # -- prefill --------------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        """Run right-padded prompts ``tokens [B, T]`` into cache rows ``slots``; last logits ``[B, V]``.

        Right padding needs no mask beyond causality: a real token never attends to a later
        (padding) position, and decode later overwrites position ``length`` first. ``start > 0``
        continues a prompt whose first ``start`` tokens are cached already (chunked prefill):
        the chunk sits at positions ``start..start+T-1`` and attends to the cached prefix too.
        """
        b, t = tokens.shape
        end = start + t
        pos = torch.arange(start, end, device=tokens.device)
        x = self._embed(tokens, pos[None].expand(b, t))
        table = None if self.cos is None else self.table[start:end][None]
        kc, vc = self.cache.k, self.cache.v
        keys = torch.arange(end, device=tokens.device)
        masks: dict[int | None, torch.Tensor] = {}

        def mask_for(window: int | None) -> torch.Tensor | None:
            if start == 0 and window is None:
                return None                                     # plain causal
            if window not in masks:
                d = pos[:, None] - keys[None, :]
                masks[window] = (d >= 0) & (d < window) if window is not None else d >= 0
            return masks[window]

        def attend(i, lw, q, k, v):
            kc[i][slots, :, start:end] = k
            vc[i][slots, :, start:end] = v
            if start:
                k, v = kc[i][slots, :, :end], vc[i][slots, :, :end]
            mask = mask_for(lw.sliding_window)
            pad = self.prefill_pad and mask is None
            if pad:
                q, k, v = _one_head_dim(lw, q, k, v)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=lw.softmax_scale,
                enable_gqa=lw.gqa)
            return out[..., :lw.v_head_dim] if pad else out

        for i, lw in enumerate(self.w.layers):
            x = self._layer(i, lw, x, table, attend)
        last = x[torch.arange(b, device=x.device), lengths - 1]      # [B, hidden]
        return self._logits(last)

    def prefill_packed(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                       cu: torch.Tensor, last: torch.Tensor, max_len: int,
                       lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Prompts packed end to end (``varlen``): ``tokens``/``positions``/``rows [T]`` (each
        token's id, position in its prompt and cache row), ``cu [n+1]`` int32 offsets, ``last
        [n]`` the index of each prompt's last token; returns its logits ``[n, V]``.

        Every linear layer runs on the ``T`` real tokens (no row padding); a captured
        bucket's padding is a sequence of its own (``packing.packed_inputs``). ``lengths``
        (host ints, one per sequence of ``cu``) selects the per-sequence SDPA of
        ``varlen.reference_varlen`` instead of the flash kernel."""
        x = self._embed(tokens[None], positions[None])
        table = None if self.cos is None else self.table[positions][None]
        kc, vc = self.cache.k, self.cache.v

        def attend(i, lw, q, k, v):
            q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))           # [T, heads, d]
            kc[i][rows, :, positions] = k
            vc[i][rows, :, positions] = v
            if lengths is not None:
                out = varlen.reference_varlen(q, k, v, lengths, lw.softmax_scale,
                                              lw.sliding_window)
            else:
                out = varlen.varlen_causal(*_one_head_dim(lw, q, k, v), cu, max_len,
                                           lw.softmax_scale, lw.sliding_window)
                out = out[..., :lw.v_head_dim]
            return out.transpose(0, 1)[None]                              # [1, H, T, v]

        for i, lw in enumerate(self.w.layers):
            x = self._layer(i, lw, x, table, attend)
        return self._logits(x[0, last])

    # -- decode ---------------------------------------------------------------------------
    def decode(self, nb: int, kv_len: int, sample: bool, tokens: torch.Tensor,
               positions: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
               top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
               logits_fn=None) -> torch.Tensor:
        """One step for batch rows ``[:nb]`` attending over ``kv_len`` cached tokens.

        Reads ``tokens[:nb]`` at ``positions[:nb]``, writes their K/V, picks the next tokens,
        stores them in ``tokens``, ``history[b, position+1]`` and advances ``positions`` (all
        in place, so a captured graph replays with no host work). Returns the next tokens.
        ``logits_fn``: ``decode_logits`` or a compiled copy of it (the engine compiles the
        model's part only: Inductor fails to generate top-p's cumsum over a 32k vocabulary,
        and sampling is a few kernels of a step).
        """
        logits = (logits_fn or self.decode_logits)(nb, kv_len, tokens, positions)
        return self.advance(nb, logits, sample, tokens, positions, history, temperature, top_k,
                            top_p, seeds)

    def decode_logits(self, nb: int, kv_len: int, tokens: torch.Tensor, positions: torch.Tensor
                      ) -> torch.Tensor:
        """The model's part of ``decode``: K/V of rows ``[:nb]`` written, logits ``[nb, V]``."""
        tok, pos = tokens[:nb], positions[:nb]
        rows = torch.arange(nb, device=tok.device)
        x = self._embed(tok[:, None], pos[:, None])                   # [nb, 1, hidden]
        table = None if self.cos is None else self.table[pos][:, None]   # [nb, 1, 2D]
        kc, vc = self.cache.k, self.cache.v
        span = torch.arange(kv_len, device=tok.device)
        full = (span[None] <= pos[:, None])[:, None, None]            # [nb, 1, 1, L]
        masks: dict[int | None, torch.Tensor] = {None: full}

        def attend(i, lw, q, k, v):
            kc[i][rows, :, pos] = k[:, :, 0]
            vc[i][rows, :, pos] = v[:, :, 0]
            if self.kernel_attention:
                out = decode_attention_op(q.reshape(nb, -1), kc[i], vc[i], pos, lw.num_attention_heads,
                                          lw.softmax_scale, lw.sliding_window, kv_len)
                return out.view(nb, 1, lw.num_attention_heads, lw.v_head_dim).transpose(1, 2)
            if lw.sliding_window not in masks:
                masks[lw.sliding_window] = full & (span[None] > pos[:, None] - lw.sliding_window)[:, None, None]
            return F.scaled_dot_product_attention(
                q, kc[i][:nb, :, :kv_len], vc[i][:nb, :, :kv_len], attn_mask=masks[lw.sliding_window],
                scale=lw.softmax_scale, enable_gqa=lw.gqa)

        for i, lw in enumerate(self.w.layers):
            x = self._layer(i, lw, x, table, attend)
        return self._logits(x[:, 0])                                   # [nb, V]

    def advance(self, nb: int, logits: torch.Tensor, sample: bool, tokens: torch.Tensor,
                positions: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Pick the next tokens from ``logits [nb, V]`` and advance the step buffers in place."""
        pos = positions[:nb]
        rows = torch.arange(nb, device=pos.device)
        if sample:
            nxt = sample_tokens(logits, temperature[:nb], top_k[:nb], top_p[:nb], seeds[:nb],
                                pos + 1)
        else:
            nxt = logits.argmax(-1)
        last = self.cache.max_seq - 1
        nxt_pos = (pos + 1).clamp(max=last)
        history[rows, nxt_pos] = nxt
        tokens[:nb] = nxt
        positions[:nb] = nxt_pos
        return nxt


def _check_static_rope(rotary, max_seq: int) -> None:
    """LongRoPE (Phi-3) picks short or long factors by the sequence's length; one static table
    built past ``original_max_position_embeddings`` would rotate short prompts with the long
    factors (wrong tokens, silently), so such a table is refused."""
    params = getattr(getattr(rotary, "config", None), "rope_parameters", None) or {}
    limit = params.get("original_max_position_embeddings")
    if getattr(rotary, "rope_type", None) == "longrope" and limit and max_seq > limit:
        from ecospa_deploy.errors import UnsupportedError

        raise UnsupportedError(f"max_seq_len={max_seq} exceeds original_max_position_embeddings="
                               f"{limit} of this longrope model: the engine's static RoPE table "
                               "cannot switch between LongRoPE's short and long factors per "
                               f"request; expected max_seq_len <= {limit} (or use HF generate)")
