"""Static KV cache, one pair of tensors per layer, each sized from that layer's own dims.

K is stored at the layer's (padded) q/k head dim and V at its v head dim: a pruned layer with
q/k dim 24 and v dim 64 stores 88 elements per KV head and token, not 128. Layout
``[max_batch, kv_heads, max_seq, dim]`` so a decode step attends over ``[:, :, :kv_len]``
(a view) and a slot is one batch row.
"""

from __future__ import annotations

import torch

from .weights import LayerWeights


class KVCache:
    def __init__(self, layers: list[LayerWeights], max_batch: int, max_seq: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_batch, self.max_seq = max_batch, max_seq
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.setup_caches(layers, max_batch, max_seq, dtype, device)

    def setup_caches(self, layers: list[LayerWeights], max_batch: int, max_seq: int,
                     dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every layer's K and V for ``max_batch`` slots of ``max_seq`` tokens."""
        self.k = [torch.zeros(max_batch, lw.num_key_value_heads, max_seq, lw.qk_head_dim, dtype=dtype,
                              device=device) for lw in layers]
        self.v = [torch.zeros(max_batch, lw.num_key_value_heads, max_seq, lw.v_head_dim, dtype=dtype,
                              device=device) for lw in layers]

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies (all layers, K and V, padded dims)."""
        return sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3]
                   * v.element_size() for k, v in zip(self.k, self.v))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
