"""Attention pieces shared by every family: per-head RoPE gather and the eager kernel.

Each family's attention module looks its kernel up by name in HF's ``ALL_ATTENTION_FUNCTIONS``
(sdpa, ...) with ``eager_attention`` as the fallback; the lookup sits in the modeling file itself
because transformers enables ``set_attn_implementation`` by finding it there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..spec import LayerSpec, rope_dim_index


# SDPA backends our models may use on CUDA. Left to itself, PyTorch (2.11, sm90) prefers cuDNN,
# which builds a new graph for every new (batch, heads, length, dims) tuple: a pruned model has a
# dozen layer shapes and a cache that grows every step, so nearly every call is a build (plain
# ``generate`` ran 6x slower than dense). Flash, memory-efficient and math never rebuild.
CUDA_SDPA_BACKENDS: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa_backends(device: torch.device):
    """Context that restricts SDPA to ``CUDA_SDPA_BACKENDS`` on CUDA (a no-op elsewhere, under
    ``torch.compile``, whose fixed shapes build once, and when the tuple is set to None).

    Entered around our models' layer loop, so only our attention calls feel it, not a user's
    other models."""
    if device.type != "cuda" or CUDA_SDPA_BACKENDS is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in CUDA_SDPA_BACKENDS])


# On CUDA, pad q/k (or v) of a pruned layer to one head dim so SDPA's flash kernel runs: it
# refuses q/k dim != v dim, and the memory-efficient kernel it falls back to measured slower.
PAD_FOR_FLASH = True


def pad_for_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """``(q, k, v, v_dim)`` with q/k and v at one head dim (exact: zero q/k dims add nothing to
    q.k); ``v_dim`` is the width to slice the output back to, None when nothing was padded."""
    qk, vd = query.shape[-1], value.shape[-1]
    if qk == vd or not PAD_FOR_FLASH or not query.is_cuda or max(qk, vd) > 256:
        return query, key, value, None
    if qk < vd:
        pad = (0, vd - qk)
        return nn.functional.pad(query, pad), nn.functional.pad(key, pad), value, None
    return query, key, nn.functional.pad(value, (0, qk - vd)), vd


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_index(layer: LayerSpec, rope_head_dim: int) -> torch.Tensor:
    """``[num_kv_heads, qk_head_dim]`` positions of each KV head's dims in the dense cos/sin."""
    assert layer.rope_kept is not None
    return torch.tensor([rope_dim_index(k, rope_head_dim) for k in layer.rope_kept],
                        dtype=torch.long)


def rope_layout(layer: LayerSpec, rope_head_dim: int) -> str:
    """``"dense"``: every head keeps every frequency in order (use cos/sin as they are);
    ``"shared"``: every KV head keeps the same ones (gather once, broadcast over heads);
    ``"per_head"``: each head gathers its own."""
    assert layer.rope_kept is not None
    kept = set(layer.rope_kept)
    if len(kept) > 1:
        return "per_head"
    if layer.qk_head_dim == rope_head_dim and list(layer.rope_kept[0]) == \
            list(range(rope_head_dim // 2)):
        return "dense"
    return "shared"


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               index: torch.Tensor, groups: int, layout: str = "per_head"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [B,H,T,d]`` and ``k [B,Hkv,T,d]`` with dense ``cos/sin [B,T,D]`` gathered per head.

    A pruned head stores its kept frequencies in rotate-half layout, so HF's rotation applies
    unchanged once cos/sin are gathered at the dense positions the head kept. ``layout`` (from
    ``rope_layout``) skips the gather where every head keeps the same frequencies: the same
    numbers with fewer kernels, which is what keeps plain ``generate`` launch-light.
    """
    if layout != "per_head":
        if layout == "shared":
            cos, sin = cos[..., index[0]], sin[..., index[0]]
        cos, sin = cos[:, None], sin[:, None]           # [B, 1, T, d]: broadcast over heads
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    cos_k = cos[:, :, index].transpose(1, 2)          # [B, Hkv, T, d]
    sin_k = sin[:, :, index].transpose(1, 2)
    if groups == 1:
        cos_q, sin_q = cos_k, sin_k
    else:
        cos_q = cos_k.repeat_interleave(groups, dim=1)
        sin_q = sin_k.repeat_interleave(groups, dim=1)
    q = q * cos_q + rotate_half(q) * sin_q
    k = k * cos_k + rotate_half(k) * sin_k
    return q, k


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                    dropout: float = 0.0, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel: any q/k dim, any v dim, GQA by repeating K/V."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights
