"""Attention pieces shared by every family: per-head RoPE gather and the eager kernel.

Each family's attention module looks its kernel up by name in HF's ``ALL_ATTENTION_FUNCTIONS``
(sdpa, ...) with ``eager_attention`` as the fallback; the lookup sits in the modeling file itself
because transformers enables ``set_attn_implementation`` by finding it there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..spec import LayerSpec, keeps_dense_rope, rope_dim_index


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
# refuses q/k dim != v dim. Calls with fewer than ``PAD_MIN_QUERY_LEN`` query rows would skip it
# where the memory-efficient kernel takes the dims as they are (no GQA, dims multiples of 8),
# saving the two or three kernels a layer that padding costs a launch-bound decode step.
# Off (0) until ``bench/sdpa_pad.py`` and ``bench/user_paths.py`` (its variant
# ``ours_unpadded_decode``) have measured the two kernels on a GPU.
PAD_FOR_FLASH = True
PAD_MIN_QUERY_LEN = 0


def pad_for_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """``(q, k, v, v_dim)`` with q/k and v at one head dim (exact: zero q/k dims add nothing to
    q.k); ``v_dim`` is the width to slice the output back to, None when nothing was padded."""
    qk, vd = query.shape[-1], value.shape[-1]
    if qk == vd or not PAD_FOR_FLASH or not query.is_cuda or max(qk, vd) > 256:
        return query, key, value, None
    if (query.shape[-2] < PAD_MIN_QUERY_LEN and query.shape[1] == key.shape[1]
            and qk % 8 == 0 and vd % 8 == 0):
        return query, key, value, None
    if qk < vd:
        return pad_last(query, vd), pad_last(key, vd), value, None
    return query, key, pad_last(value, qk), vd


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied when its data pointer is not 16-byte aligned. A pruned GPT-2's q/k/v are
    views into one ``c_attn`` output at offsets of odd widths; CUDA attention kernels load
    16-byte vectors and fault ("misaligned address") on such a base pointer."""
    return x if not x.is_cuda or x.data_ptr() % 16 == 0 else x.clone()


_ZERO: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zeros appended on the last dim up to ``size``: one ``cat`` with a broadcast
    zero scalar (kept per device and dtype), one kernel where ``F.pad`` launches two."""
    key = (x.device, x.dtype)
    zero = _ZERO.get(key)
    if zero is None:
        zero = _ZERO[key] = torch.zeros((), device=x.device, dtype=x.dtype)
    return torch.cat((x, zero.expand(*x.shape[:-1], size - x.shape[-1])), dim=-1)


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[B, T, 2D]``: HF's dense ``cos`` then ``sin`` with its first half negated, built once
    per forward so that each layer gathers its kept frequencies from it in one kernel and
    rotates with ``x * cos + swap_halves(x) * signed_sin`` (three kernels, no negation).

    ``rotate_half(x) * sin == swap_halves(x) * signed_sin`` exactly: ``-(a) * b == a * (-b)``.
    """
    half = cos.shape[-1] // 2
    return torch.cat((cos, -sin[..., :half], sin[..., half:]), dim=-1)


def rope_index(layer: LayerSpec, rope_head_dim: int) -> torch.Tensor:
    """``[num_kv_heads, 2 * qk_head_dim]``: positions in ``rope_table`` of each KV head's cos
    entries, then of its signed-sin entries (its dims' dense positions, offset by the dense dim)."""
    assert layer.rope_kept is not None
    rows = [rope_dim_index(k, rope_head_dim) for k in layer.rope_kept]
    return torch.tensor([r + [j + rope_head_dim for j in r] for r in rows], dtype=torch.long,
                        device="cpu")


def rope_layout(layer: LayerSpec, rope_head_dim: int) -> str:
    """``"dense"``: every head keeps every frequency in order (use the table as it is);
    ``"shared"``: every KV head keeps the same ones (gather once, broadcast over heads);
    ``"per_head"``: each KV head gathers its own."""
    assert layer.rope_kept is not None
    if keeps_dense_rope(layer, rope_head_dim):
        return "dense"
    return "per_head" if len(set(layer.rope_kept)) > 1 else "shared"


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    swapped = torch.cat((x2, x1), dim=-1)
    if torch.onnx.is_in_onnx_export():   # the legacy exporter types fp16 addcmul as float32
        return x * cos + swapped * signed_sin
    return torch.addcmul(x * cos, swapped, signed_sin)


class RopeGather:
    """Every layer's kept cos/sin from the dense ``rope_table`` in one gather per forward.

    Plain ``generate`` at batch 1 is bound by kernel launches, so a pruned model must not pay
    one gather per layer where the dense model pays none: the model gathers the kept positions
    of all layers at once (``index``, a buffer it owns) and each layer takes views of its slice.
    ``slots[i]`` is ``(layout, offset, num_kv_heads, 2 * qk_head_dim)`` of layer ``i``.
    """

    def __init__(self, layers: list[LayerSpec], rope_head_dim: int):
        self.slots: list[tuple[str, int, int, int]] = []
        parts, offset = [], 0
        for layer in layers:
            layout = rope_layout(layer, rope_head_dim)
            index = rope_index(layer, rope_head_dim)
            if layout == "shared":
                index = index[:1]
            self.slots.append((layout, offset, index.shape[0], index.shape[1]))
            if layout != "dense":
                parts.append(index.flatten())
                offset += index.numel()
        # On the CPU even while a model is built on the meta device: the buffer is a copy.
        self.index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device="cpu")

    def gather(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """``[B, T, N]``: one kernel for all layers (None when every layer is dense)."""
        return table[..., index] if index.numel() else None

    def layer(self, i: int, table: torch.Tensor, gathered: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ``(cos, signed_sin)``: ``[B, 1, T, D]`` (dense, the table itself),
        ``[B, 1, T, d]`` (shared) or ``[B, Hkv, T, d]`` (per head); views, no kernel."""
        layout, offset, heads, width = self.slots[i]
        if layout == "dense":
            part = table[:, None]
        else:
            part = gathered[..., offset:offset + heads * width]
            part = part[:, None] if layout == "shared" else \
                part.unflatten(-1, (heads, width)).transpose(1, 2)
        return part.chunk(2, dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [B,H,T,d]`` and ``k [B,Hkv,T,d]`` with one layer's ``(cos, signed_sin)``
    (``RopeGather.layer``).

    A pruned head stores its kept frequencies in rotate-half layout, so HF's rotation applies
    unchanged once cos/sin are taken at the dense positions the head kept. With per-head cos/sin
    the query heads of a KV group share theirs by broadcasting (``q`` viewed as
    ``[B, Hkv, groups, T, d]``), not by copies.
    """
    k_out = _rotate(k, cos, sin)
    if cos.shape[1] == 1 or groups == 1:
        return _rotate(q, cos, sin), k_out
    b, h, t, d = q.shape
    q = _rotate(q.view(b, h // groups, groups, t, d), cos[:, :, None], sin[:, :, None])
    return q.view(b, h, t, d), k_out


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
