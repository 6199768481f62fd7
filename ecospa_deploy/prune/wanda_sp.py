"""Wanda-sp: the structured Wanda baseline of the FLAP paper (An et al., AAAI 2024).

Wanda scores a weight by ``|W_ij|·‖X_j‖₂`` (its magnitude times the norm of the input feature
it multiplies). Wanda-sp lifts that to the input channels of the two output projections,
``o_proj`` (one channel per v dim of each query head) and ``down_proj`` (one per FFN channel),
the channels whose removal removes a whole head or FFN channel:

- **Score**: channel ``j`` scores ``‖X_j‖₂·‖W[:, j]‖₂`` (``X_j``: that input channel over every
  calibration token, from ``activations.collect``; ``W[:, j]``: its weight column). A head
  scores the sum over its channels, a KV group the sum over its query heads (the GQA ports
  of the FLAP code sum a group's channels the same way). ``weight_norm=1`` uses
  ``‖W[:, j]‖₁`` instead, the ranking of the FLAP release code (which averages ``|W_ij|``
  over the rows: the same order within a module).
- **Structure**: the same ratio in every layer for heads and for FFN channels, each layer
  removing ``int(ratio·n)`` of its units (the release's rounding), the ratio solved so the
  model lands on ``target`` parameters; whole heads move the count in steps, so the FFN ratio
  is re-solved with the heads fixed (``anchor_units.uniform_shapes``). No layer goes below its
  floors (``floors.Floors``: FFN width, one KV group).
- **Heads under GQA**: ``heads="groups"`` (default) removes whole KV groups, ``"query"`` the
  same number of query heads from every group (``anchor_units``).
- **No compensation**: the weights are not changed.

Calibration statistics come from one forward pass of the input model, as Wanda's paper
describes its metric; the FLAP release prunes layer by layer and feeds each pruned layer's
output to the next (a sequential variant this one-pass version does not reproduce).
"""

from __future__ import annotations

import torch
from torch import nn

from ecospa_deploy.padding import Canon
from ecospa_deploy.prune.activations import LayerStats, collect
from ecospa_deploy.prune.anchor_units import check_heads, group_size, select, uniform_shapes
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.spec import LayerSpec


def channel_scores(w: torch.Tensor, energy: torch.Tensor, weight_norm: float = 2.0
                   ) -> torch.Tensor:
    """``‖X_j‖₂·‖W[:, j]‖_p`` per input channel of ``W [out, in]``; ``energy[j] = Σ_t x_tj²``."""
    cols = torch.linalg.vector_norm(w.detach().double(), ord=weight_norm, dim=0)
    return energy.double().clamp_min(0).sqrt().to(cols.device) * cols


def wanda_scores(c: Canon, stats: LayerStats, lspec: LayerSpec, weight_norm: float = 2.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KV group ``[n_kv]``, query head ``[n_kv, group]``, FFN channel ``[ffn]``) scores."""
    n_kv, g = lspec.num_key_value_heads, group_size(lspec)
    o = channel_scores(c["o"][0], stats.o.gram.diagonal(), weight_norm)
    head = o.view(n_kv, g, lspec.v_head_dim).sum(2)
    ffn = channel_scores(c["down"][0], stats.down.gram.diagonal(), weight_norm)
    return head.sum(1), head, ffn


def prune_wanda_sp(model: nn.Module, windows: torch.Tensor, target: int, floors: Floors,
                   batch_size: int = 1, *, heads: str = "groups", weight_norm: float = 2.0
                   ) -> list[LayerMask]:
    """Masks relative to ``model`` (unchanged) keeping ``target`` parameters, one ratio per
    layer (see the module docstring)."""
    check_heads(heads)
    spec = model.config.ecospa_spec
    shapes, _ = uniform_shapes(model, target, floors, heads, range(spec.num_layers), "wanda-sp")
    stats = collect(model, windows, batch_size, desc="wanda-sp: activations")
    masks = []
    for layer, lspec, shape, st in zip(model.decoder_layers, spec.layers, shapes, stats):
        group, head, ffn = wanda_scores(layer.canonical(), st, lspec, weight_norm)
        masks.append(select(shape, group, head, ffn).mask(lspec))
    return masks


__all__ = ["channel_scores", "wanda_scores", "prune_wanda_sp"]
