"""The engine's forward passes over ``ModelWeights``: batched prefill and one decode step.

Plain tensor code with no host syncs and no data-dependent Python control flow, so the decode
step can be captured as one CUDA graph and compiled with ``fullgraph=True``. Everything that
changes per step (tokens, positions, sampling parameters) lives in static device buffers owned
by the caller; the KV length attended to is a Python int (a bucket), so each captured graph
reads only the cache it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache
from .kernels.attention import decode_attention_op
from .sampling import sample_tokens
from .weights import LayerWeights, ModelWeights


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half`` for the engine's interleaved layout: pair ``(2p, 2p+1)`` -> ``(-x[2p+1], x[2p])``."""
    x2 = x.unflatten(-1, (-1, 2))
    return torch.stack((-x2[..., 1], x2[..., 0]), dim=-1).flatten(-2)


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

    def _rope(self, i: int, lw: LayerWeights, q: torch.Tensor, k: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [B,H,T,d]``, ``k [B,Hkv,T,d]``; ``cos/sin [B,T,D]`` at the dense head dim."""
        if lw.rope_shared:
            idx = lw.k_rope[0]
            cq = ck = cos[..., idx][:, None]
            sq = sk = sin[..., idx][:, None]
        else:
            ck = cos[:, :, lw.k_rope].transpose(1, 2)          # [B, Hkv, T, d]
            sk = sin[:, :, lw.k_rope].transpose(1, 2)
            cq = cos[:, :, lw.q_rope].transpose(1, 2)
            sq = sin[:, :, lw.q_rope].transpose(1, 2)
        return q * cq + _rotate_pairs(q) * sq, k * ck + _rotate_pairs(k) * sk

    # -- pieces ---------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if self.w.rms_norm:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.w.norm_eps)
            return weight * h.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.w.norm_eps)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.w.embed)
        if self.w.pos_embed is not None:
            x = x + F.embedding(positions, self.w.pos_embed)
        return x

    def _qkv(self, lw: LayerWeights, x: torch.Tensor):
        b, t = x.shape[:2]
        qkv = F.linear(x, lw.qkv_w, lw.qkv_b)
        heads, kv_heads, qk, vd = lw.num_heads, lw.num_kv_heads, lw.qk_head_dim, lw.v_head_dim
        q_end = heads * qk                            # rows: q | k | v | alignment padding
        k_end = q_end + kv_heads * qk
        q = qkv[..., :q_end].view(b, t, heads, qk).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, t, kv_heads, qk).transpose(1, 2)
        v = qkv[..., k_end:k_end + kv_heads * vd].view(b, t, kv_heads, vd).transpose(1, 2)
        return q, k, v

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, lw.up_w, lw.up_b)
        if self.w.gated:                                        # rows interleave gate_i, up_i
            h = h.unflatten(-1, (lw.ffn, 2))
            h = self.w.act(h[..., 0]) * h[..., 1]
        else:
            h = self.w.act(h)
        return F.linear(h, lw.down_w, lw.down_b)

    def _layer(self, i: int, lw: LayerWeights, x: torch.Tensor, cos, sin, attend) -> torch.Tensor:
        q, k, v = self._qkv(lw, self._norm(x, *lw.norm1))
        if cos is not None:
            q, k = self._rope(i, lw, q, k, cos, sin)
        out = attend(i, lw, q, k, v)                            # [B, H, T, v]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, lw.num_heads * lw.v_head_dim)
        x = x + F.linear(out, lw.o_w, lw.o_b)
        return x + self._mlp(lw, self._norm(x, *lw.norm2))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(h, *self.w.final_norm), self.w.lm_head).float()

    # -- prefill --------------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor
                ) -> torch.Tensor:
        """Run right-padded prompts ``tokens [B, T]`` into cache rows ``slots``; last logits ``[B, V]``.

        Right padding needs no mask beyond causality: a real token never attends to a later
        (padding) position, and decode later overwrites position ``length`` first.
        """
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)
        x = self._embed(tokens, pos[None].expand(b, t))
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[:t][None], self.sin[:t][None]
        kc, vc = self.cache.k, self.cache.v
        windows: dict[int, torch.Tensor] = {}

        def attend(i, lw, q, k, v):
            kc[i][slots, :, :t] = k
            vc[i][slots, :, :t] = v
            mask = None
            if lw.window is not None:
                if lw.window not in windows:
                    d = pos[:, None] - pos[None, :]
                    windows[lw.window] = (d >= 0) & (d < lw.window)
                mask = windows[lw.window]
            d = max(lw.qk_head_dim, lw.v_head_dim)
            if not self.prefill_pad or mask is not None or lw.qk_head_dim == lw.v_head_dim:
                d = None
            elif lw.qk_head_dim < d:
                q, k = F.pad(q, (0, d - lw.qk_head_dim)), F.pad(k, (0, d - lw.qk_head_dim))
            else:
                v = F.pad(v, (0, d - lw.v_head_dim))
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=lw.scale,
                enable_gqa=lw.gqa)
            return out if d is None else out[..., :lw.v_head_dim]

        for i, lw in enumerate(self.w.layers):
            x = self._layer(i, lw, x, cos, sin, attend)
        last = x[torch.arange(b, device=x.device), lengths - 1]      # [B, hidden]
        return self._logits(last)

    # -- decode ---------------------------------------------------------------------------
    def decode(self, nb: int, kv_len: int, sample: bool, tokens: torch.Tensor,
               positions: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
               top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """One step for batch rows ``[:nb]`` attending over ``kv_len`` cached tokens.

        Reads ``tokens[:nb]`` at ``positions[:nb]``, writes their K/V, picks the next tokens,
        stores them in ``tokens``, ``history[b, position+1]`` and advances ``positions`` (all
        in place, so a captured graph replays with no host work). Returns the next tokens.
        """
        tok, pos = tokens[:nb], positions[:nb]
        rows = torch.arange(nb, device=tok.device)
        x = self._embed(tok[:, None], pos[:, None])                   # [nb, 1, hidden]
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [nb, 1, D]
        kc, vc = self.cache.k, self.cache.v
        span = torch.arange(kv_len, device=tok.device)
        full = (span[None] <= pos[:, None])[:, None, None]            # [nb, 1, 1, L]
        masks: dict[int | None, torch.Tensor] = {None: full}

        def attend(i, lw, q, k, v):
            kc[i][rows, :, pos] = k[:, :, 0]
            vc[i][rows, :, pos] = v[:, :, 0]
            if self.kernel_attention:
                out = decode_attention_op(q.reshape(nb, -1), kc[i], vc[i], pos, lw.num_heads,
                                          lw.scale, lw.window, kv_len)
                return out.view(nb, 1, lw.num_heads, lw.v_head_dim).transpose(1, 2)
            if lw.window not in masks:
                masks[lw.window] = full & (span[None] > pos[:, None] - lw.window)[:, None, None]
            return F.scaled_dot_product_attention(
                q, kc[i][:nb, :, :kv_len], vc[i][:nb, :, :kv_len], attn_mask=masks[lw.window],
                scale=lw.scale, enable_gqa=lw.gqa)

        for i, lw in enumerate(self.w.layers):
            x = self._layer(i, lw, x, cos, sin, attend)
        logits = self._logits(x[:, 0])                                 # [nb, V]
        return self.advance(nb, logits, sample, tokens, positions, history, temperature, top_k,
                            top_p, seeds)

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
