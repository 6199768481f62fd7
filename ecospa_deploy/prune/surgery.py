"""Shape surgery on our models: slice (remove), zero out (the reference) and pad (exact zeros).

All three work on each layer's canonical projections (``layer.canonical()``: ``q, k, v, o,
[gate,] up, down`` as ``(weight [out, in], bias)``), so one implementation serves every family.

- ``slice_model`` removes what a mask drops, in place, and returns the new ``ModelSpec``.
- ``zero_out`` keeps shapes and writes zeros where a mask drops: the masked dense model the
  golden invariant compares against (docs/DESIGN.md §3).
- ``add_output_biases`` adds a bias to o_proj/down_proj (bias compensation: the mean of what
  a removal took away, FLAP), creating the bias and setting the spec flag where there was none.
- ``pad_model`` appends exact zeros (q/k dims by rotary pair, v dims, FFN neurons, KV groups)
  so widths reach hardware-friendly sizes without changing a single logit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ecospa_deploy.padding import (QK_NORMS, Canon, head_norm_per_head, head_norm_rows,
                                   pad_canonical, padded_layer, round_up)
from ecospa_deploy.prune.mask import LayerMask, ResolvedLayerMask, resolve
from ecospa_deploy.spec import LayerSpec, ModelSpec, SpecError, qk_norm_heads


def _check_masks(model: nn.Module, masks: Sequence[LayerMask | None]) -> list[ResolvedLayerMask]:
    spec: ModelSpec = model.config.ecospa_spec
    if len(masks) != spec.num_layers:
        raise SpecError(f"got {len(masks)} layer masks; expected {spec.num_layers} (one per "
                        "layer, None to keep a layer whole)")
    return [resolve(m, layer, i, spec.rope) for i, (m, layer) in enumerate(zip(masks, spec.layers))]


def _row_index(heads: Sequence[int], dims: Sequence[Sequence[int]], head_dim: int,
               group_of: Sequence[int]) -> list[int]:
    """Rows of a head-major projection: for each kept head, its kept dims (by its group)."""
    return [h * head_dim + d for h, g in zip(heads, group_of) for d in dims[g]]


def _indices(r: ResolvedLayerMask, layer: LayerSpec) -> dict[str, list[int]]:
    group = layer.num_attention_heads // layer.num_key_value_heads
    kv_pos = {g: i for i, g in enumerate(r.kv_heads)}
    q_group = [kv_pos[h // group] for h in r.q_heads]
    kv_self = list(range(len(r.kv_heads)))
    return {
        "q": _row_index(r.q_heads, r.qk_dims, layer.qk_head_dim, q_group),
        "k": _row_index(r.kv_heads, r.qk_dims, layer.qk_head_dim, kv_self),
        "v": _row_index(r.kv_heads, r.v_dims, layer.v_head_dim, kv_self),
        "o": _row_index(r.q_heads, r.v_dims, layer.v_head_dim, q_group),
        "ffn": list(r.ffn),
    }


def _sliced_spec(r: ResolvedLayerMask, layer: LayerSpec, rope: bool) -> LayerSpec:
    rope_kept = None
    if rope:
        half = layer.qk_head_dim // 2
        rope_kept = tuple(tuple(layer.rope_kept[g][p] for p in dims if p < half)
                          for g, dims in zip(r.kv_heads, r.qk_dims))
    return layer.replace(num_attention_heads=len(r.q_heads), num_key_value_heads=len(r.kv_heads),
                         qk_head_dim=len(r.qk_dims[0]), v_head_dim=len(r.v_dims[0]),
                         intermediate_size=len(r.ffn), rope_kept=rope_kept)


def _take(t: torch.Tensor | None, idx: list[int], dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device))


def _slice_canonical(c: Canon, idx: dict[str, list[int]], old: LayerSpec, new: LayerSpec,
                     rope_head_dim: int | None, index: int) -> Canon:
    out: Canon = {}
    for key in QK_NORMS:    # q/k norm weights follow the kept k rows (per KV head), no bias
        if key in c:
            w = head_norm_per_head(c[key][0], old.num_key_value_heads, old.qk_head_dim)
            out[key] = (head_norm_rows(_take(w, idx["k"], 0), new.num_key_value_heads,
                                       qk_norm_heads(new, rope_head_dim), index), None)
    for key in ("q", "k", "v"):
        w, b = c[key]
        out[key] = (_take(w, idx[key], 0), _take(b, idx[key], 0))
    w, b = c["o"]
    out["o"] = (_take(w, idx["o"], 1), b)
    for key in ("gate", "up"):
        if key in c:
            w, b = c[key]
            out[key] = (_take(w, idx["ffn"], 0), _take(b, idx["ffn"], 0))
    w, b = c["down"]
    out["down"] = (_take(w, idx["ffn"], 1), b)
    return out


def _replace_layer(model: nn.Module, i: int, new_spec: LayerSpec, tensors: Canon) -> None:
    old = model.decoder_layers[i]
    ref = next(old.parameters())
    with torch.device(ref.device):
        new = model.build_layer(new_spec, i).to(ref.dtype)
    new.load_canonical(tensors)
    for name in old.norm_names:
        getattr(new, name).load_state_dict(getattr(old, name).state_dict())
    new.train(old.training)
    model.decoder_layers[i] = new


def _commit_spec(model: nn.Module, layers: list[LayerSpec], **provenance) -> ModelSpec:
    spec = model.config.ecospa_spec.replace_layers(layers, **provenance)
    model.config.set_spec(spec)
    model.spec_changed()
    return spec


@torch.no_grad()
def slice_model(model: nn.Module, masks: Sequence[LayerMask | None]) -> ModelSpec:
    """Remove what ``masks`` drop, in place; return (and store in the config) the new spec."""
    spec: ModelSpec = model.config.ecospa_spec
    resolved = _check_masks(model, masks)
    layers = []
    for i, (r, layer) in enumerate(zip(resolved, spec.layers)):
        new_spec = _sliced_spec(r, layer, spec.rope)
        new_spec.validate(i, spec.rope_head_dim)
        if new_spec != layer:
            tensors = _slice_canonical(model.decoder_layers[i].canonical(), _indices(r, layer),
                                       layer, new_spec, spec.rope_head_dim, i)
            _replace_layer(model, i, new_spec, tensors)
        layers.append(new_spec)
    return _commit_spec(model, layers)


def _zero(t: torch.Tensor | None, keep: list[int], dim: int) -> None:
    if t is None:
        return
    drop = torch.ones(t.shape[dim], dtype=torch.bool, device=t.device)
    drop[torch.tensor(keep, dtype=torch.long, device=t.device)] = False
    t.masked_fill_(drop.view([-1 if d == dim else 1 for d in range(t.dim())]), 0)


@torch.no_grad()
def zero_out(model: nn.Module, masks: Sequence[LayerMask | None]) -> None:
    """Write zeros wherever ``masks`` drop, keeping every shape (the golden reference).

    q/k norm weights stay: a zeroed q/k dim is zero before the norm and after it, and the norm
    divides by the dense head dim, which is what the sliced model's norm divides by too."""
    spec: ModelSpec = model.config.ecospa_spec
    resolved = _check_masks(model, masks)
    for i, (r, layer) in enumerate(zip(resolved, spec.layers)):
        c = model.decoder_layers[i].canonical()
        idx = _indices(r, layer)
        for key in ("q", "k", "v"):
            _zero(c[key][0], idx[key], 0)
            _zero(c[key][1], idx[key], 0)
        _zero(c["o"][0], idx["o"], 1)
        for key in ("gate", "up"):
            if key in c:
                _zero(c[key][0], idx["ffn"], 0)
                _zero(c[key][1], idx["ffn"], 0)
        _zero(c["down"][0], idx["ffn"], 1)


@torch.no_grad()
def pad_model(model: nn.Module, *, qk_multiple: int | None = None,
              v_multiple: int | None = None, ffn_multiple: int | None = None,
              qk_head_dim: int | None = None, v_head_dim: int | None = None,
              kv_heads_multiple: int | None = None) -> ModelSpec:
    """Pad every layer with exact zeros (``ecospa_deploy.padding``), in place; logits do not change.

    ``*_multiple`` round a width up; ``qk_head_dim``/``v_head_dim`` set one head dim for every
    layer (a runtime with one head size). ``kv_heads_multiple`` appends whole zero KV groups
    (their query heads write through zero o_proj columns), for tensor parallelism.
    """
    spec: ModelSpec = model.config.ecospa_spec
    layers = []
    for i, layer in enumerate(spec.layers):
        new = padded_layer(
            layer, spec.rope_head_dim,
            qk_head_dim=qk_head_dim or round_up(layer.qk_head_dim, qk_multiple),
            v_head_dim=v_head_dim or round_up(layer.v_head_dim, v_multiple),
            intermediate_size=round_up(layer.intermediate_size, ffn_multiple),
            num_key_value_heads=round_up(layer.num_key_value_heads, kv_heads_multiple), index=i)
        if new != layer:
            c = model.decoder_layers[i].canonical()
            _replace_layer(model, i, new, pad_canonical(c, layer, new, spec.rope,
                                                        spec.rope_head_dim))
        layers.append(new)
    return _commit_spec(model, layers)


@torch.no_grad()
def add_output_biases(model: nn.Module, biases: Sequence[dict[str, torch.Tensor] | None]
                      ) -> ModelSpec:
    """Add ``biases[i]["o"]`` / ``["down"]`` (``[hidden]``) to layer ``i``'s output projections,
    in place; a layer without such a bias gets one (``o_bias``/``down_bias`` set in its spec)."""
    spec: ModelSpec = model.config.ecospa_spec
    if len(biases) != spec.num_layers:
        raise SpecError(f"got {len(biases)} layer biases; expected {spec.num_layers}")
    layers = []
    for i, (add, layer) in enumerate(zip(biases, spec.layers)):
        unknown = set(add or {}) - {"o", "down"}
        if unknown:
            raise SpecError(f"layer {i}: biases for {sorted(unknown)}; expected 'o' or 'down'")
        if not add:
            layers.append(layer)
            continue
        c = dict(model.decoder_layers[i].canonical())
        new = layer.replace(o_bias=layer.o_bias or "o" in add,
                            down_bias=layer.down_bias or "down" in add)
        for key, delta in add.items():
            w, b = c[key]
            base = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
            c[key] = (w, base + delta.to(device=w.device, dtype=w.dtype))
        if new != layer:
            _replace_layer(model, i, new, c)
        else:
            model.decoder_layers[i].load_canonical(c)
        layers.append(new)
    return _commit_spec(model, layers)


__all__ = ["slice_model", "zero_out", "pad_model", "add_output_biases", "LayerMask"]
