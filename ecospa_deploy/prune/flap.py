"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024), default setting
("WIFV" metric, "AL-AM" structure, bias compensation).

- **Metric (WIFV)**: input channel ``j`` of ``o_proj``/``down_proj`` scores the fluctuation of
  that channel over the calibration tokens (its sample variance: how badly a constant can
  stand in for it) times the squared norm of its weight column, ``Var(X_j)·‖W[:, j]‖²``. The
  release code squares the attention (``o_proj``) metric once more before standardising; we
  follow it. Statistics come from ``activations.collect`` on the input model (FLAP also
  measures every layer on the unpruned model's activations).
- **Standardisation**: per layer and module, the channel scores become
  ``(s − mean(s)) / std(s)`` (unbiased std), so attention and FFN scores of every layer share
  one scale. A head scores the *mean* of its standardised channels; under GQA a KV group
  scores the mean over all its query heads' channels (as the GQA ports of the FLAP code do).
- **Adaptive structure (AL-AM)**: every head unit and FFN channel of every layer goes into one
  list ranked by that score; units are kept from the top until the kept *parameters* reach
  the target (FLAP weights each unit by its parameter count, 512/3 FFN channels per LLaMA-7B
  head; here each unit's exact parameter cost from ``ParamCounter``, KV heads, biases and
  the compensation biases included). Equivalently, units go lowest first until the model
  holds ``target`` parameters; a removal that would undershoot by more than one FFN channel
  is passed over while smaller units remain. Unlike the release (which may empty a layer's
  attention), no layer goes below its floors (``floors.Floors``: FFN width, one KV group; one
  query head per group).
- **Heads under GQA**: ``heads="groups"`` (default) removes whole KV groups; ``"query"``
  removes the same number of query heads from every group, the k-th such removal scoring the
  mean over groups of each group's k-th lowest head score (``anchor_units``).
- **Bias compensation**: the removed channels' calibration mean ``x̄_j`` times their weight
  columns is added to the projection's bias, ``b += Σ_{j removed} W[:, j]·x̄_j``, so the
  pruned projection's mean output on the calibration data equals the dense one's
  (``surgery.add_output_biases``, which creates the bias where the model has none). This
  rewrites ``model`` in place; the returned masks apply to the rewritten model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ecospa_deploy.padding import Canon
from ecospa_deploy.prune.activations import LayerStats, Moments, collect
from ecospa_deploy.prune.anchor_units import (Selection, Shape, check_heads, group_size,
                                              head_mode, top)
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import add_output_biases
from ecospa_deploy.prune.tracking import ParamCounter
from ecospa_deploy.spec import LayerSpec


def fluctuation(m: Moments) -> torch.Tensor:
    """Sample variance of each input channel over the calibration tokens."""
    return m.var * (m.n / max(m.n - 1, 1))


def wifv(w: torch.Tensor, m: Moments) -> torch.Tensor:
    """``Var(X_j)·‖W[:, j]‖²`` per input channel of ``W [out, in]``."""
    cols = w.detach().double().pow(2).sum(0)
    return fluctuation(m).to(cols.device) * cols


def standardize(s: torch.Tensor) -> torch.Tensor:
    """``(s − mean) / std`` (unbiased); all zeros where the scores do not vary."""
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    return torch.zeros_like(s) if float(std) == 0 else (s - s.mean()) / std


def flap_scores(c: Canon, stats: LayerStats, lspec: LayerSpec
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised (KV group ``[n_kv]``, query head ``[n_kv, group]``, FFN ``[ffn]``) scores."""
    n_kv, g = lspec.num_key_value_heads, group_size(lspec)
    attn = standardize(wifv(c["o"][0], stats.o).pow(2))
    head = attn.view(n_kv, g, lspec.v_head_dim).mean(2)
    return head.mean(1), head, standardize(wifv(c["down"][0], stats.down))


@dataclass
class _Layer:
    """What the search has removed from one layer so far."""

    mode: str
    shape: Shape
    groups: set[int] = field(default_factory=set)      # removed KV groups
    slots: int = 0                                     # query heads removed per group
    ffn: set[int] = field(default_factory=set)         # removed FFN channels
    attn_bias: bool = False                            # o_proj gets a compensation bias
    ffn_bias: bool = False

    def spec(self, lspec: LayerSpec) -> LayerSpec:
        return self.shape.spec(lspec, o_bias=lspec.o_bias or self.attn_bias,
                               down_bias=lspec.down_bias or self.ffn_bias)


def _units(scores, modes: Sequence[str]) -> list[tuple[float, int, str, int]]:
    """Every removable unit as ``(score, layer, kind, index)``, lowest score first."""
    units = []
    for i, ((group, head, ffn), mode) in enumerate(zip(scores, modes)):
        if mode == "query":
            # the k-th query head to leave every group: each group's k-th lowest, averaged
            slots = torch.sort(head, dim=1).values.mean(0)
            units += [(float(s), i, "slot", k) for k, s in enumerate(slots.tolist())]
        else:
            units += [(float(s), i, "group", k) for k, s in enumerate(group.tolist())]
        units += [(float(s), i, "ffn", j) for j, s in enumerate(ffn.tolist())]
    return sorted(units)


def _removed(st: _Layer, kind: str, idx: int, floors: Floors, i: int) -> Shape | None:
    """The layer's shape without unit ``(kind, idx)``, or None if gone or below a floor."""
    s = st.shape
    if kind == "ffn":
        if idx in st.ffn or s.ffn <= floors(i, "ffn"):
            return None
        return Shape(s.groups, s.per_group, s.ffn - 1)
    if kind == "group":
        if idx in st.groups or s.groups <= floors.kv_groups:
            return None
        return Shape(s.groups - 1, s.per_group, s.ffn)
    if idx != st.slots or s.per_group <= 1:
        return None
    return Shape(s.groups, s.per_group - 1, s.ffn)


def search(model: nn.Module, scores, target: int, floors: Floors, heads: str,
           compensate: bool = True) -> list[Selection]:
    """AL-AM: the kept units of every layer for ``target`` parameters (see module docstring)."""
    spec = model.config.ecospa_spec
    counter = ParamCounter(model)
    state = [_Layer(head_mode(l, heads), Shape.of(l)) for l in spec.layers]
    smallest = [_Layer(st.mode, Shape(
        st.shape.groups if st.mode == "query" else min(st.shape.groups, floors.kv_groups),
        1 if st.mode == "query" else st.shape.per_group,
        min(st.shape.ffn, floors(i, "ffn"))), attn_bias=compensate, ffn_bias=compensate)
        for i, st in enumerate(state)]
    low = counter.total([s.spec(l) for s, l in zip(smallest, spec.layers)])
    if low > target:
        raise floors.unreachable(target, low, "flap")
    current = counter.total([s.spec(l) for s, l in zip(state, spec.layers)])
    channel = min((counter.layer(i, l) - counter.layer(i, l.replace(
        intermediate_size=l.intermediate_size - 1)) for i, l in enumerate(spec.layers)
        if l.intermediate_size), default=0)
    units = _units(scores, [st.mode for st in state])
    for strict in (True, False):
        for _, i, kind, idx in units:
            if current <= target:
                break
            st, lspec = state[i], spec.layers[i]
            shape = _removed(st, kind, idx, floors, i)
            if shape is None:
                continue
            new = _Layer(st.mode, shape, st.groups, st.slots, st.ffn,
                         st.attn_bias or (compensate and kind != "ffn"),
                         st.ffn_bias or (compensate and kind == "ffn"))
            after = current - counter.layer(i, st.spec(lspec)) + counter.layer(i, new.spec(lspec))
            if strict and after < target - channel:
                continue
            if kind == "ffn":
                st.ffn.add(idx)
            elif kind == "group":
                st.groups.add(idx)
            else:
                st.slots += 1
            st.shape, st.attn_bias, st.ffn_bias = shape, new.attn_bias, new.ffn_bias
            current = after
    out = []
    for st, lspec, (_, head, _) in zip(state, spec.layers, scores):
        g = group_size(lspec)
        groups = [k for k in range(lspec.num_key_value_heads) if k not in st.groups]
        out.append(Selection(groups, [top(head[k], g - st.slots) for k in groups],
                             [j for j in range(lspec.intermediate_size) if j not in st.ffn]))
    return out


def compensation(c: Canon, stats: LayerStats, lspec: LayerSpec, mask: LayerMask
                 ) -> dict[str, torch.Tensor]:
    """``{"o"|"down": Σ_{j removed} W[:, j]·x̄_j}`` for the projections that lose channels."""
    dv = lspec.v_head_dim
    kept_o = {h * dv + t for h in mask.q_heads for t in range(dv)}
    removed = {"o": [j for j in range(lspec.num_attention_heads * dv) if j not in kept_o]}
    kept_ffn = set(mask.ffn)
    removed["down"] = [j for j in range(lspec.intermediate_size) if j not in kept_ffn]
    out = {}
    for key, idx in removed.items():
        if idx:
            w = c[key][0].detach().double()
            mean = stats[key].mean.to(w.device)
            out[key] = w[:, idx] @ mean[idx]
    return out


def prune_flap(model: nn.Module, windows: torch.Tensor, target: int, floors: Floors,
               batch_size: int = 1, *, heads: str = "groups", compensate: bool = True
               ) -> list[LayerMask]:
    """Masks keeping ``target`` parameters; with ``compensate`` (FLAP's default) also adds the
    compensation biases to ``model`` in place (the masks apply to the model as left)."""
    check_heads(heads)
    spec = model.config.ecospa_spec
    stats = collect(model, windows, batch_size, desc="flap: activations")
    canon = [layer.canonical() for layer in model.decoder_layers]
    scores = [flap_scores(c, st, l) for c, st, l in zip(canon, stats, spec.layers)]
    chosen = search(model, scores, target, floors, heads, compensate)
    masks = [sel.mask(l) for sel, l in zip(chosen, spec.layers)]
    if compensate:
        add_output_biases(model, [compensation(c, st, l, m) or None
                                  for c, st, l, m in zip(canon, stats, spec.layers, masks)])
    return masks


__all__ = ["fluctuation", "wifv", "standardize", "flap_scores", "search", "compensation",
           "prune_flap"]
