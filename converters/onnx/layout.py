"""KV-cache layouts of an ONNX export: which shape each layer's past/present tensors have.

A pruned layer's own cache is ``K [batch, kv_heads_i, seq, qk_dim_i]`` and
``V [batch, kv_heads_i, seq, v_dim_i]``. Runtimes size their buffers from fewer numbers than
that, so an export picks one of three targets:

- ``ort``: every tensor of its own shape; the smallest cache. Only our ``OrtGenerator`` runs it.
- ``genai``: per layer, K and V of one head size ``max(qk_dim_i, v_dim_i)`` (onnxruntime-genai
  reads each layer's shape from the graph but sizes a layer's V buffer from its K).
- ``optimum``: every layer ``[batch, max kv_heads, seq, P]``, one shape for the whole model
  (optimum builds a single empty-cache shape from ``config.json``: ``num_key_value_heads`` and
  ``hidden_size // num_attention_heads``). Runs on optimum, onnxruntime-genai and
  ``OrtGenerator``; the default.

The graph pads with zeros after the model has written its cache and slices the padding off
before attention reads it, so every layout computes exactly what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.spec import ModelSpec

TARGETS = ("optimum", "genai", "ort")
DEFAULT_TARGET = "optimum"


@dataclass(frozen=True)
class CacheShape:
    """One layer's past/present shape in the export (``[batch, heads, seq, size]``); the
    metadata spells the sizes ``key_head_size``/``value_head_size``."""

    num_key_value_heads: int
    qk_head_dim: int
    v_head_dim: int

    @property
    def elements_per_token(self) -> int:
        return self.num_key_value_heads * (self.qk_head_dim + self.v_head_dim)

    def as_dict(self) -> dict[str, int]:
        return {"num_key_value_heads": self.num_key_value_heads,
                "key_head_size": self.qk_head_dim, "value_head_size": self.v_head_dim}


@dataclass(frozen=True)
class KVLayout:
    target: str
    cache: tuple[CacheShape, ...]
    # optimum's head size is ``hidden_size // num_attention_heads`` of config.json, so the
    # uniform size P comes with the head count that config.json declares for it.
    config_num_attention_heads: int | None = None

    @property
    def elements_per_token(self) -> int:
        return sum(c.elements_per_token for c in self.cache)

    def overhead_pct(self, spec: ModelSpec) -> float:
        own = sum(layer.num_key_value_heads * (layer.qk_head_dim + layer.v_head_dim)
                  for layer in spec.layers)
        return 100.0 * (self.elements_per_token - own) / own


def _uniform_size(spec: ModelSpec) -> tuple[int, int]:
    """``(num_attention_heads, P)`` with ``hidden // heads == P >= every layer's head dim``."""
    need = max(max(layer.qk_head_dim, layer.v_head_dim) for layer in spec.layers)
    heads = spec.hidden_size // need          # the most heads whose size still fits
    if heads < 1:
        raise UnsupportedError(f"target 'optimum' needs hidden_size ({spec.hidden_size}) >= the "
                               f"largest head dim ({need}); use --target genai or ort")
    return heads, spec.hidden_size // heads


def plan_layout(spec: ModelSpec, target: str) -> KVLayout:
    """The cache shapes ``target`` needs for ``spec`` (see the module docstring)."""
    if target not in TARGETS:
        raise UnsupportedError(f"target={target!r}; expected one of {list(TARGETS)}")
    if target == "ort":
        return KVLayout(target, tuple(CacheShape(l.num_key_value_heads, l.qk_head_dim,
                                                 l.v_head_dim) for l in spec.layers))
    if target == "genai":
        return KVLayout(target, tuple(
            CacheShape(l.num_key_value_heads, max(l.qk_head_dim, l.v_head_dim),
                       max(l.qk_head_dim, l.v_head_dim)) for l in spec.layers))
    heads, size = _uniform_size(spec)
    kv_heads = max(layer.num_key_value_heads for layer in spec.layers)
    return KVLayout(target, tuple(CacheShape(kv_heads, size, size) for _ in spec.layers),
                    config_num_attention_heads=heads)


__all__ = ["TARGETS", "DEFAULT_TARGET", "CacheShape", "KVLayout", "plan_layout"]
