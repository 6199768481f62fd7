"""Bookkeeping shared by the pruners: what survives (in the input model's indices) and its size.

Pruners that work in rounds slice a working copy between rounds, so the units they see are
renumbered each time. ``KeptIndices`` remembers, per layer, which *original* heads, rotary
pairs/dims, value dims and neurons the current model still holds, turns a selection made on the
current model into a ``LayerMask`` for ``slice_model``, and at the end gives masks relative to the
input model (what the checkpoint's provenance records and the golden test replays).

``ParamCounter`` predicts a model's parameter count from per-layer specs with
``ModelSpec.layer_params`` (plus the layer-independent embedding/norm parameters measured once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ecospa_deploy.prune.mask import LayerMask, pairs_to_dims, resolve
from ecospa_deploy.spec import LayerSpec, ModelSpec


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_fraction_target(model: nn.Module, fraction: float) -> float:
    """The ``PruneOptions.target_size`` (share of all parameters) that removes ``fraction`` of
    the decoder-layer parameters (the papers' "pruning ratio"; embeddings are never pruned)."""
    total = count_params(model)
    layers = sum(count_params(layer) for layer in model.decoder_layers)
    return 1.0 - fraction * layers / total


class ParamCounter:
    """Parameter count of a model as a function of its per-layer specs."""

    def __init__(self, model: nn.Module):
        self.spec: ModelSpec = model.config.ecospa_spec
        actual = [count_params(layer) for layer in model.decoder_layers]
        self.overhead = [a - self.spec.layer_params(s, norms=0)
                         for a, s in zip(actual, self.spec.layers)]
        self.base = count_params(model) - sum(actual)

    def layer(self, i: int, spec: LayerSpec) -> int:
        return self.spec.layer_params(spec, norms=0) + self.overhead[i]

    def total(self, layers: Sequence[LayerSpec]) -> int:
        return self.base + sum(self.layer(i, s) for i, s in enumerate(layers))


@dataclass
class LayerKeep:
    """A selection on the *current* layer: kept KV groups and, per kept group, kept units."""

    groups: list[int]
    qk: list[list[int]]        # per kept group: kept rotary pairs (RoPE) or q/k dims
    vo: list[list[int]]        # per kept group: kept value dims
    ffn: list[int]


@dataclass
class KeptLayer:
    """Original indices still held by one current layer (current order)."""

    q_heads: list[int]
    kv_heads: list[int]
    qk: list[list[int]]
    vo: list[list[int]]
    ffn: list[int]


@dataclass
class KeptIndices:
    spec: ModelSpec                        # the input model's spec
    layers: list[KeptLayer] = field(default_factory=list)

    @classmethod
    def identity(cls, spec: ModelSpec) -> "KeptIndices":
        out = cls(spec)
        for layer in spec.layers:
            qk_units = layer.qk_head_dim // 2 if spec.rope else layer.qk_head_dim
            out.layers.append(KeptLayer(
                q_heads=list(range(layer.num_attention_heads)),
                kv_heads=list(range(layer.num_key_value_heads)),
                qk=[list(range(qk_units)) for _ in range(layer.num_key_value_heads)],
                vo=[list(range(layer.v_head_dim)) for _ in range(layer.num_key_value_heads)],
                ffn=list(range(layer.intermediate_size))))
        return out

    # -- a selection on the current model -> its LayerMask, and update the bookkeeping -----
    def apply(self, i: int, current: LayerSpec, keep: LayerKeep) -> LayerMask:
        rope = self.spec.rope
        kept = self.layers[i]
        group = current.num_attention_heads // current.num_key_value_heads
        groups = sorted(keep.groups)
        order = {g: n for n, g in enumerate(keep.groups)}
        qk = [sorted(keep.qk[order[g]]) for g in groups]
        vo = [sorted(keep.vo[order[g]]) for g in groups]
        ffn = sorted(keep.ffn)
        q_heads = [g * group + j for g in groups for j in range(group)]
        mha = current.num_attention_heads == current.num_key_value_heads
        mask = LayerMask(
            q_heads=q_heads, kv_heads=None if mha else groups,
            qk_dims=[pairs_to_dims(u, current.qk_head_dim) if rope else u for u in qk],
            v_dims=vo, ffn=ffn)
        new = KeptLayer(
            q_heads=[kept.q_heads[h] for h in q_heads],
            kv_heads=[kept.kv_heads[g] for g in groups],
            qk=[[kept.qk[g][u] for u in units] for g, units in zip(groups, qk)],
            vo=[[kept.vo[g][u] for u in units] for g, units in zip(groups, vo)],
            ffn=[kept.ffn[j] for j in ffn])
        self.layers[i] = new
        return mask

    # -- masks relative to the input model --------------------------------------------------
    def masks(self) -> list[LayerMask]:
        out = []
        for layer, kept in zip(self.spec.layers, self.layers):
            mha = layer.num_attention_heads == layer.num_key_value_heads
            qk = [pairs_to_dims(u, layer.qk_head_dim) if self.spec.rope else list(u)
                  for u in kept.qk]
            out.append(LayerMask(q_heads=list(kept.q_heads),
                                 kv_heads=None if mha else list(kept.kv_heads),
                                 qk_dims=qk, v_dims=[list(u) for u in kept.vo],
                                 ffn=list(kept.ffn)))
        return out


def masks_to_json(masks: Sequence[LayerMask], spec: ModelSpec) -> list[dict]:
    """Kept indices of arbitrary masks (resolved against ``spec``) as JSON lists."""
    out = []
    for i, (m, layer) in enumerate(zip(masks, spec.layers)):
        r = resolve(m, layer, i, spec.rope)
        out.append({"q_heads": list(r.q_heads), "kv_heads": list(r.kv_heads),
                    "qk_dims": [list(d) for d in r.qk_dims], "v_dims": [list(d) for d in r.v_dims],
                    "ffn": list(r.ffn)})
    return out


__all__ = ["count_params", "layer_fraction_target", "ParamCounter", "LayerKeep", "KeptLayer", "KeptIndices", "masks_to_json"]
