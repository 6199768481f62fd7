"""LLM-Pruner, block-wise (Ma et al., NeurIPS 2023), in its default setting ("taylor" importance,
``param_first``, ``sum`` aggregation, local pruning, one step); recovery (LoRA) is not part of it.

- **Groups** (the paper's coupled structures that block-wise pruning removes): an attention
  head (its ``q``, ``k``, ``v`` rows and ``o`` columns) and an FFN channel (its ``gate`` and
  ``up`` rows and ``down`` column). The hidden dim is never pruned, so norms and embeddings
  are in no group.
- **Importance** (``param_first``, sum aggregation): element-wise first-order Taylor
  ``|w·∂L/∂w|`` summed over every weight of the group, ``∂L/∂w`` the gradient of the LM loss
  on the calibration windows (``gradients.loss_gradients``; LLM-Pruner takes one backward pass
  over 10 samples). Biases are not scored (the release scores ``weight`` only).
- **Heads under GQA**: ``heads="groups"`` (default) removes whole KV groups, as LLM-Pruner's
  GQA support does (``k_proj`` as the root of the attention group, whole KV heads of
  ``head_dim`` consecutive channels, the query heads that read them following): a group
  scores its KV head's ``k``/``v`` rows plus the ``q`` rows and ``o`` columns of its query
  heads ``h`` with ``h // group == g`` (HF's ``repeat_kv`` order; the release folds the ``q``/``o``
  scores onto KV channels by ``index mod n_kv·d``, which pairs query head ``h`` with KV head
  ``h mod n_kv``: we score what is removed). ``heads="query"`` removes the same number of
  query heads from every group, each scoring its own ``q`` rows and ``o`` columns
  (``anchor_units``).
- **Structure**: one ratio for heads and FFN channels in every layer of the pruned range
  (local, not global pruning), the ratio solved so the whole model lands on ``target``
  parameters (the FFN ratio re-solved with whole heads fixed, ``anchor_units.uniform_shapes``);
  layers outside the range are untouched; floors (``floors.Floors``) hold.
- **Layer range**: for LLaMA-7B the paper prunes layers 4..29 (``--block_*_layer_start 4
  --block_*_layer_end 30`` of 32), sparing the first four and the last two, which it found the
  most sensitive. Other depths ``L`` scale that: ``start = max(1, round(4L/32))``,
  ``end = L − max(1, round(2L/32))``, at least one layer spared at each end (SmolLM2-135M,
  30 layers: 4..27; 3 layers: layer 1 only). ``layers=`` sets the range explicitly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.padding import Canon
from ecospa_deploy.prune.anchor_units import check_heads, group_size, select, uniform_shapes
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.gradients import loss_gradients
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.units import canonical_of
from ecospa_deploy.spec import LayerSpec


def layer_range(num_layers: int) -> range:
    """The paper's LLaMA-7B range 4..29 of 32, scaled to ``num_layers`` (see module docstring)."""
    start = max(1, int(4 * num_layers / 32 + 0.5))
    end = num_layers - max(1, int(2 * num_layers / 32 + 0.5))
    if start >= end:
        raise EcospaError(f"llm-pruner: a model of {num_layers} layers leaves no layer to prune "
                          "after sparing the first and the last; expected at least 3 layers "
                          "(or pass layers=)")
    return range(start, end)


def _salience(c: Canon, g: Canon, key: str) -> torch.Tensor:
    """``|w·∂L/∂w|`` of one projection's weight ``[out, in]``."""
    w = c[key][0].detach().float()
    return (w * g[key][0].detach().float().to(w.device)).abs()


def taylor_scores(c: Canon, g: Canon, lspec: LayerSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KV group ``[n_kv]``, query head ``[n_kv, group]``, FFN ``[ffn]``) importances from the
    canonical weights ``c`` and gradients ``g``."""
    n_q, n_kv = lspec.num_attention_heads, lspec.num_key_value_heads
    q = _salience(c, g, "q").reshape(n_q, -1).sum(1)
    o = _salience(c, g, "o").sum(0).view(n_q, lspec.v_head_dim).sum(1)
    kv = (_salience(c, g, "k").reshape(n_kv, -1).sum(1)
          + _salience(c, g, "v").reshape(n_kv, -1).sum(1))
    head = (q + o).view(n_kv, group_size(lspec))
    ffn = sum(_salience(c, g, key).sum(1) for key in ("gate", "up") if key in c)
    ffn = ffn + _salience(c, g, "down").sum(0)
    return head.sum(1) + kv, head, ffn


def _check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise EcospaError(f"llm-pruner: layers={list(layers)!r} is invalid; expected layer "
                          f"indices in [0, {num_layers}), at least one")
    return out


def prune_llm_pruner(model: nn.Module, windows: torch.Tensor, target: int, floors: Floors,
                     batch_size: int = 1, *, heads: str = "groups",
                     layers: Sequence[int] | None = None) -> list[LayerMask]:
    """Masks relative to ``model`` (unchanged) keeping ``target`` parameters, block-wise over
    ``layers`` (default ``layer_range``; see the module docstring)."""
    check_heads(heads)
    spec = model.config.ecospa_spec
    pruned = list(layer_range(spec.num_layers)) if layers is None else \
        _check_layers(layers, spec.num_layers)
    span = f"{pruned[0]}..{pruned[-1]}" if pruned == list(range(pruned[0], pruned[-1] + 1)) \
        else str(pruned)
    label = "llm-pruner" if len(pruned) == spec.num_layers else \
        f"llm-pruner (pruning layers {span} only)"
    shapes, _ = uniform_shapes(model, target, floors, heads, pruned, label)
    grads = loss_gradients(model, windows, batch_size, layers=pruned,
                           desc="llm-pruner: gradients")
    masks = []
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        if grads[i] is None:
            masks.append(LayerMask())
            continue
        scores = taylor_scores(layer.canonical(), canonical_of(layer, grads[i]), lspec)
        masks.append(select(shapes[i], *scores).mask(lspec))
    return masks


__all__ = ["layer_range", "taylor_scores", "prune_llm_pruner"]
