"""The decoder as an ONNX-exportable function: flat tensors in, logits and per-layer present out.

ONNX has no notion of a cache object, so the exported graph takes every layer's past key and
value as its own input (``past_key_values.{i}.key`` ``[batch, kv_heads_i, past, qk_dim_i]`` and
``.value`` ``[batch, kv_heads_i, past, v_dim_i]``) and returns the concatenated ``present.{i}.*``
of the same per-layer shapes. Inside, the flat tensors fill a ``DynamicCache`` and the model runs
through its own forward, so the graph computes what the HF classes compute.

A ``KVLayout`` other than ``ort`` (see ``layout``) gives the past/present tensors larger
shapes: the graph slices each past back to the layer's own heads and dims before the model reads
it, and pads each present with zeros after, so the padding never reaches attention.

The attention mask is built here, not by transformers' mask helpers, from the 2D padding mask
``[batch, past + seq]``: key ``s`` is visible to query ``t`` when it is not padding, is not in
the future (``s <= past + t``) and, for sliding-window layers, lies inside the window. A prefill
is simply a call with ``past = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from ecospa_deploy.families import family_of_model
from ecospa_deploy.modeling.kv_cache import cache_kwargs
from ecospa_deploy.spec import ModelSpec

from .layout import KVLayout, plan_layout


@dataclass(frozen=True)
class GraphIO:
    """Input/output names of the exported decoder (the ``genai_config.json`` names)."""

    num_layers: int
    use_past: bool

    @property
    def past_names(self) -> list[str]:
        if not self.use_past:
            return []
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers)
                for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        if not self.use_past:
            return []
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def inputs(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def outputs(self) -> list[str]:
        return ["logits", *self.present_names]


def additive_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype,
                  sliding_window: int | None = None) -> torch.Tensor:
    """``[batch, 1, seq, past+seq]`` additive mask (0 = visible, dtype min = hidden)."""
    total = attention_mask.shape[1]
    device = attention_mask.device
    q_pos = torch.arange(query_len, device=device) + (total - query_len)
    k_pos = torch.arange(total, device=device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    visible = visible[None, None] & attention_mask[:, None, None, :].bool()
    zeros = torch.zeros(visible.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~visible, torch.finfo(dtype).min)


def _crop(t: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """The layer's own ``[batch, heads, seq, size]`` part of a (possibly padded) past."""
    if t.shape[1] != heads:
        t = t[:, :heads]
    return t if t.shape[3] == size else t[..., :size]


def _pad(t: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """Zero-pad a present ``[batch, h, seq, d]`` to ``[batch, heads, seq, size]``."""
    extra_heads, extra = heads - t.shape[1], size - t.shape[3]
    return F.pad(t, (0, extra, 0, 0, 0, extra_heads)) if extra_heads or extra else t


class DecoderGraph(nn.Module):
    """Wraps our causal LM so that its signature is the flat ONNX one (see module docstring)."""

    def __init__(self, model: nn.Module, use_past: bool = True, layout: KVLayout | None = None):
        super().__init__()
        self.model = model
        self.spec: ModelSpec = model.config.ecospa_spec
        self.layout = layout or plan_layout(self.spec, "ort")
        self.io = GraphIO(self.spec.num_layers, use_past)
        windows = {layer.sliding_window for layer in self.spec.layers} - {None}
        self.sliding_window = windows.pop() if windows else None
        self.mask_by_type = family_of_model(model).attention_mask == "by_type"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: tuple[torch.Tensor, ...] = ()
                ) -> tuple[torch.Tensor, ...]:
        dtype = self.model.lm_head.weight.dtype
        seq = input_ids.shape[1]
        full = additive_mask(attention_mask, seq, dtype)
        if self.mask_by_type:
            mask: dict[str, torch.Tensor] | torch.Tensor = {"full_attention": full}
            if self.sliding_window is not None:
                mask["sliding_attention"] = additive_mask(attention_mask, seq, dtype,
                                                          self.sliding_window)
        else:
            mask = full
        cache = None
        if self.io.use_past:
            cache = DynamicCache()
            for i, layer in enumerate(self.spec.layers):
                heads = layer.num_key_value_heads
                key = _crop(past[2 * i], heads, layer.qk_head_dim)
                value = _crop(past[2 * i + 1], heads, layer.v_head_dim)
                cache.update(key, value, i)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=self.io.use_past, **cache_kwargs(cache))
        if cache is None:
            return (out.logits,)
        present: list[torch.Tensor] = []
        for layer, shape in zip(cache.layers, self.layout.cache):
            present += [_pad(layer.keys, shape.num_key_value_heads, shape.qk_head_dim),
                        _pad(layer.values, shape.num_key_value_heads, shape.v_head_dim)]
        return (out.logits, *present)

    # -- example inputs for tracing -------------------------------------------------------
    def example_inputs(self, batch: int = 2, past: int = 3, seq: int = 4) -> tuple:
        """Distinct batch/past/seq sizes so the exporter cannot unify the dynamic axes."""
        device = self.model.lm_head.weight.device
        dtype = self.model.lm_head.weight.dtype
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        p = past if self.io.use_past else 0
        mask = torch.ones(batch, p + seq, dtype=torch.long, device=device)
        pos = (torch.arange(seq, device=device) + p)[None].expand(batch, seq).contiguous()
        tensors: list[torch.Tensor] = []
        if self.io.use_past:
            for shape in self.layout.cache:
                for dim in (shape.qk_head_dim, shape.v_head_dim):
                    tensors.append(torch.randn(batch, shape.num_key_value_heads, past, dim,
                                               generator=gen).to(device=device, dtype=dtype))
        return (ids, mask, pos, tuple(tensors))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Legacy-exporter axis names for every input and output."""
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
        for name in self.io.past_names:
            axes[name] = {0: "batch", 2: "past_sequence"}
        for name in self.io.present_names:
            axes[name] = {0: "batch", 2: "total_sequence"}
        return axes

    def dynamic_shapes(self) -> tuple:
        """``torch.export`` dims (past inputs nested as one tuple, like the argument).

        The total length gets its own ``Dim``: Dims cannot be added.
        """
        from torch.export import Dim

        batch, seq = Dim("batch"), Dim("sequence")
        total, past = Dim("total_sequence"), Dim("past_sequence")
        past_shapes = tuple({0: batch, 2: past} for _ in self.io.past_names)
        return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, past_shapes)


__all__ = ["DecoderGraph", "GraphIO", "additive_mask"]
