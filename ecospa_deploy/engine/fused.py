"""The decode step built from the engine's Triton kernels: five launches per layer.

Per layer: (1) norm + QKV projection + RoPE + K/V cache write, (2) attention over each row's own
length at the stored q/k and v dims, (3) o_proj + residual, (4) norm + gate|up projection +
gated activation, (5) down_proj + residual; then norm + LM head. Same math and same weights
(layout included) as ``Forward.decode``, which it replaces on CUDA; prefill stays in PyTorch
(large matmuls, where cuBLAS and SDPA are at their best). Rounding differs from the PyTorch path
only in where fp32 intermediates are rounded to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward import Forward
from .kernels.attention import decode_attention
from .kernels.linear import (ACTIVATIONS, ACT_NONE, MAX_ROWS, NORM_LAYER, NORM_RMS, fused_linear,
                             fused_qkv)
from .weights import ModelWeights


def unsupported_reason(weights: ModelWeights, max_batch: int) -> str | None:
    """Why the fused decode cannot run this model, or None when it can."""
    if weights.act_name not in ACTIVATIONS:
        return (f"activation {weights.act_name!r} has no fused kernel; expected one of "
                f"{sorted(ACTIVATIONS)}")
    if any(lw.k_norm is not None for lw in weights.layers):
        # A deliberate choice: the QKV epilogue fuses RoPE, and the q/k norm would need a
        # per-head reduction before it; the PyTorch step (captured as a graph) runs these models.
        return "the per-head q/k norm (Qwen3) is not fused into the QKV kernel"
    if max_batch > MAX_ROWS:
        return f"max_batch_size={max_batch} exceeds the fused decode's {MAX_ROWS} rows"
    return None


class FusedDecode:
    """``decode(...)`` with the signature of ``Forward.decode``, on the Triton kernels."""

    def __init__(self, forward: Forward):
        self.f = forward
        w = forward.w
        self.norm_kind = NORM_RMS if w.rms_norm else NORM_LAYER
        self.act = ACTIVATIONS[w.act_name]
        self.rope_rows: list[torch.Tensor | None] = []
        for lw in w.layers:
            if lw.q_rope is None:
                self.rope_rows.append(None)
                continue
            rows = torch.zeros(lw.qkv_w.shape[0], dtype=torch.int32, device=forward.device)
            qk = torch.cat([lw.q_rope.flatten(), lw.k_rope.flatten()])
            rows[:qk.numel()] = qk.to(torch.int32)
            self.rope_rows.append(rows)

    def decode(self, nb: int, kv_len: int, sample: bool, tokens: torch.Tensor,
               positions: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
               top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        f, w = self.f, self.f.w
        tok, pos = tokens[:nb], positions[:nb]
        x = F.embedding(tok, w.embed)
        if w.pos_embed is not None:
            x = x + F.embedding(pos, w.pos_embed)
        norm = dict(norm_kind=self.norm_kind, eps=w.norm_eps)
        kc, vc = f.cache.k, f.cache.v
        for i, lw in enumerate(w.layers):
            rope = None if self.rope_rows[i] is None else (f.cos, f.sin, self.rope_rows[i])
            q = fused_qkv(x, lw.qkv_w, lw.qkv_b, norm=lw.norm1, **norm,
                          num_heads=lw.num_attention_heads, k_cache=kc[i], v_cache=vc[i], positions=pos,
                          rope=rope)
            a = decode_attention(q, kc[i], vc[i], pos, num_heads=lw.num_attention_heads, scale=lw.softmax_scale,
                                 window=lw.sliding_window, kv_len=kv_len)
            x = fused_linear(a, lw.o_w, lw.o_b, residual=x)
            h = fused_linear(x, lw.up_w, lw.up_b, norm=lw.norm2, **norm, act=self.act,
                             gated=w.gated)
            x = fused_linear(h, lw.down_w, lw.down_b, residual=x)
        logits = fused_linear(x, w.lm_head, None, norm=w.final_norm, **norm, act=ACT_NONE,
                              out_dtype=torch.float32)
        return f.advance(nb, logits, sample, tokens, positions, history, temperature, top_k,
                         top_p, seeds)
