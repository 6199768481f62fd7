"""Shape surgery on our models: slice (remove), zero out (the reference) and pad (exact zeros).

All three work on each layer's canonical projections (``layer.canonical()``: ``q, k, v, o,
[gate,] up, down`` as ``(weight [out, in], bias)``), so one implementation serves every family.

- ``slice_model`` removes what a mask drops, in place, and returns the new ``ModelSpec``.
- ``zero_out`` keeps shapes and writes zeros where a mask drops: the masked dense model the
  golden invariant compares against (docs/DESIGN.md §3).
- ``pad_model`` appends exact zeros (q/k dims by rotary pair, v dims, FFN neurons, KV groups)
  so widths reach hardware-friendly sizes without changing a single logit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ecospa_deploy.prune.mask import LayerMask, ResolvedLayerMask, resolve
from ecospa_deploy.spec import LayerSpec, ModelSpec, SpecError

Canon = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


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


def _slice_canonical(c: Canon, idx: dict[str, list[int]]) -> Canon:
    out: Canon = {}
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
            tensors = _slice_canonical(model.decoder_layers[i].canonical(), _indices(r, layer))
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
    """Write zeros wherever ``masks`` drop, keeping every shape (the golden reference)."""
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


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad_rows(w: torch.Tensor | None, heads: int, old: int, new: int, dim: int,
              rope_pairs: bool) -> torch.Tensor | None:
    """Grow each head's block of ``old`` dims to ``new`` along ``dim`` with zeros.

    With ``rope_pairs`` the zeros go to the end of both rotate-half halves so existing pairs stay
    partners.
    """
    if w is None or new == old:
        return w
    shape = list(w.shape)
    blocks = w.movedim(dim, 0).reshape(heads, old, *[s for j, s in enumerate(shape) if j != dim])
    pad_shape = list(blocks.shape)
    if rope_pairs:
        half, extra = old // 2, (new - old) // 2
        pad_shape[1] = extra
        z = blocks.new_zeros(pad_shape)
        blocks = torch.cat([blocks[:, :half], z, blocks[:, half:], z], dim=1)
    else:
        pad_shape[1] = new - old
        blocks = torch.cat([blocks, blocks.new_zeros(pad_shape)], dim=1)
    return blocks.reshape(heads * new, *blocks.shape[2:]).movedim(0, dim)


def _pad_axis(w: torch.Tensor | None, new: int, dim: int) -> torch.Tensor | None:
    if w is None or w.shape[dim] == new:
        return w
    shape = list(w.shape)
    shape[dim] = new - w.shape[dim]
    return torch.cat([w, w.new_zeros(shape)], dim=dim)


@torch.no_grad()
def pad_model(model: nn.Module, *, qk_multiple: int | None = None,
              v_multiple: int | None = None, ffn_multiple: int | None = None,
              qk_head_dim: int | Sequence[int] | None = None,
              v_head_dim: int | Sequence[int] | None = None,
              kv_heads_multiple: int | None = None) -> ModelSpec:
    """Pad every layer with exact zeros, in place; logits do not change.

    ``*_multiple`` round a width up; ``qk_head_dim``/``v_head_dim`` set a target head dim, one
    for every layer or one per layer (what vLLM needs). ``kv_heads_multiple`` appends whole zero
    KV groups (their query heads write through zero o_proj columns), for tensor parallelism.
    With RoPE, padded q/k pairs may exceed the rotary dim: they are zeros, so whatever frequency
    rotates them (frequency 0 here) adds nothing to q·k.
    """
    spec: ModelSpec = model.config.ecospa_spec
    n = len(spec.layers)
    qk_dims = [qk_head_dim] * n if qk_head_dim is None or isinstance(qk_head_dim, int) \
        else list(qk_head_dim)
    v_dims = [v_head_dim] * n if v_head_dim is None or isinstance(v_head_dim, int) \
        else list(v_head_dim)
    if len(qk_dims) != n or len(v_dims) != n:
        raise SpecError(f"per-layer head dims for {len(qk_dims)}/{len(v_dims)} layers; the model "
                        f"has {n}")
    layers = []
    for i, layer in enumerate(spec.layers):
        qk = qk_dims[i] or _round_up(layer.qk_head_dim, qk_multiple)
        v = v_dims[i] or _round_up(layer.v_head_dim, v_multiple)
        ffn = _round_up(layer.intermediate_size, ffn_multiple)
        n_kv = _round_up(layer.num_key_value_heads, kv_heads_multiple)
        if qk < layer.qk_head_dim or v < layer.v_head_dim:
            raise SpecError(f"layer {i}: cannot pad qk_head_dim={layer.qk_head_dim}/v_head_dim="
                            f"{layer.v_head_dim} down to {qk}/{v}; targets must be >= the layer's")
        rope_kept = layer.rope_kept
        if spec.rope:
            if qk % 2:
                raise SpecError(f"layer {i}: padded qk_head_dim={qk} is odd; RoPE needs pairs")
            # Zero dims need a frequency index, not a distinct one: reuse frequency 0.
            rope_kept = tuple(tuple(kept) + (0,) * (qk // 2 - len(kept))
                              for kept in layer.rope_kept)
            rope_kept = rope_kept + tuple((0,) * (qk // 2)
                                          for _ in range(n_kv - layer.num_key_value_heads))
        group = layer.num_attention_heads // layer.num_key_value_heads
        new = layer.replace(qk_head_dim=qk, v_head_dim=v, intermediate_size=ffn,
                            num_key_value_heads=n_kv, num_attention_heads=n_kv * group,
                            rope_kept=rope_kept)
        new.validate(i, spec.rope_head_dim)
        if new != layer:
            c = model.decoder_layers[i].canonical()
            h, hk = layer.num_attention_heads, layer.num_key_value_heads
            out: Canon = {}
            for key, heads in (("q", h), ("k", hk)):
                w, b = c[key]
                w = _pad_rows(w, heads, layer.qk_head_dim, qk, 0, spec.rope)
                b = _pad_rows(b, heads, layer.qk_head_dim, qk, 0, spec.rope)
                width = (new.q_width if key == "q" else new.k_width)
                out[key] = (_pad_axis(w, width, 0), _pad_axis(b, width, 0))
            w, b = c["v"]
            w = _pad_rows(w, hk, layer.v_head_dim, v, 0, False)
            b = _pad_rows(b, hk, layer.v_head_dim, v, 0, False)
            out["v"] = (_pad_axis(w, new.v_width, 0), _pad_axis(b, new.v_width, 0))
            w, b = c["o"]
            out["o"] = (_pad_axis(_pad_rows(w, h, layer.v_head_dim, v, 1, False), new.o_width, 1),
                        b)
            for key in ("gate", "up"):
                if key in c:
                    w, b = c[key]
                    out[key] = (_pad_axis(w, ffn, 0), _pad_axis(b, ffn, 0))
            w, b = c["down"]
            out["down"] = (_pad_axis(w, ffn, 1), b)
            _replace_layer(model, i, new, out)
        layers.append(new)
    return _commit_spec(model, layers)


__all__ = ["slice_model", "zero_out", "pad_model", "LayerMask"]
