"""``--align N``: round every pruned width to a multiple of ``N`` so GEMMs hit fast kernels.

Widths are ``H·d_qk`` (q), ``H_kv·d_qk`` (k), ``H_kv·d_v`` (v), ``H·d_v`` (o) and the FFN width;
head counts stay as the method chose, so ``d_qk`` and ``d_v`` move in steps of
``N / gcd(N, H_kv)`` (doubled for rotary pairs) and the FFN in steps of ``N``. Each width goes
to the nearest allowed value (never above the input model's); units come back or leave by
their coupled score (Eq. 10 norms of the input model). If the rounded model is over the target,
FFN blocks then shrink by ``N`` neurons, cheapest first (lowest coupled score), until it is not.
``AlignReport`` states what rounding cost in parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask, resolve
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.units import layer_norms, shrink, unit_counts


@dataclass
class AlignReport:
    multiple: int
    params_unaligned: int
    params_aligned: int
    changes: list[str] = field(default_factory=list)

    @property
    def cost(self) -> int:
        """Parameters the rounding added (negative: removed)."""
        return self.params_aligned - self.params_unaligned


def _steps(spec, lspec, n_kv: int, multiple: int) -> dict[str, int]:
    """Unit step per block so every width is a multiple of ``multiple``."""
    dim_step = multiple // math.gcd(multiple, n_kv)
    qk_step = dim_step
    if spec.rope:     # units are pairs: d = 2·units must be a multiple of dim_step
        qk_step = dim_step // math.gcd(dim_step, 2)
    return {"qk": qk_step, "vo": dim_step, "ffn": multiple}


def _nearest(n: int, step: int, limit: int, floor: int = 1) -> int:
    """The multiple of ``step`` in ``[max(step, floor), limit]`` nearest to ``n`` (ties keep
    more). ``n`` itself when no multiple fits."""
    candidates = [c for c in range(step, limit + 1, step) if c >= min(floor, n)]
    if not candidates:
        return n
    return min(candidates, key=lambda c: (abs(c - n), -c))


def align_masks(model: nn.Module, masks: list[LayerMask | None], multiple: int, target: int,
                floors: Floors | None = None) -> tuple[list[LayerMask], AlignReport]:
    """Masks (relative to ``model``) whose every width is a multiple of ``multiple``; no width
    is rounded below its floor (nor an FFN cut below it to meet the target)."""
    spec = model.config.ecospa_spec
    floors = floors or Floors.of(spec)
    counter = ParamCounter(model)
    rope = spec.rope
    before_layers, after_layers, keeps, scores = [], [], [], []
    changes = []
    for i, (layer, lspec, m) in enumerate(zip(model.decoder_layers, spec.layers, masks)):
        r = resolve(m, lspec, i, rope)
        norms = layer_norms(layer.canonical(), lspec, rope)
        units = unit_counts(lspec, rope)
        half = lspec.qk_head_dim // 2
        groups = list(r.kv_heads)
        group = lspec.num_attention_heads // lspec.num_key_value_heads
        kept = {
            "qk": [[p for p in d if p < half] if rope else list(d) for d in r.qk_dims],
            "vo": [list(d) for d in r.v_dims],
            "ffn": [list(r.ffn)],
        }
        steps = _steps(spec, lspec, len(groups), multiple)
        layer_scores = {"qk": norms.coupled("qk")[groups], "vo": norms.coupled("vo")[groups],
                        "ffn": norms.coupled("ffn").view(1, -1)}
        cur = lspec.replace(num_attention_heads=len(r.q_heads), num_key_value_heads=len(groups),
                            rope_kept=None)
        for block in ("qk", "vo", "ffn"):
            cur = shrink(cur, block, len(kept[block][0]), rope)
        before_layers.append(cur)
        for block in ("qk", "vo", "ffn"):
            n = len(kept[block][0])
            want = _nearest(n, steps[block], units[block], floors(i, block))
            if want != n:
                kept[block] = [_resize(k, want, layer_scores[block][g])
                               for g, k in enumerate(kept[block])]
                changes.append(f"layer {i} {block}: {n} -> {want} units")
            cur = shrink(cur, block, len(kept[block][0]), rope)
        after_layers.append(cur)
        keeps.append((groups, kept, r, group))
        scores.append(layer_scores["ffn"][0])
    total = counter.total(after_layers)
    while total > target:
        best = None
        for i, (groups, kept, r, group) in enumerate(keeps):
            ffn = kept["ffn"][0]
            if len(ffn) - multiple < min(floors(i, "ffn"), len(ffn)) or len(ffn) <= multiple:
                continue
            cost = float(torch.sort(scores[i][ffn]).values[:multiple].sum())
            if best is None or cost < best[0]:
                best = (cost, i)
        if best is None:
            break
        i = best[1]
        ffn = keeps[i][1]["ffn"][0]
        keeps[i][1]["ffn"][0] = _resize(ffn, len(ffn) - multiple, scores[i])
        changes.append(f"layer {i} ffn: -{multiple} neurons to meet the target")
        after_layers[i] = shrink(after_layers[i], "ffn", len(keeps[i][1]["ffn"][0]), rope)
        total = counter.total(after_layers)
    tracker = KeptIndices.identity(spec)
    for i, (groups, kept, r, group) in enumerate(keeps):
        tracker.apply(i, spec.layers[i], LayerKeep(groups=groups, qk=kept["qk"], vo=kept["vo"],
                                                    ffn=kept["ffn"][0]))
    report = AlignReport(multiple, counter.total(before_layers), total, changes)
    return tracker.masks(), report


def _resize(kept: list[int], n: int, scores: torch.Tensor) -> list[int]:
    """``kept`` grown with the best-scored missing units or cut to its best ``n``."""
    if n <= len(kept):
        order = sorted(kept, key=lambda u: float(scores[u]), reverse=True)
        return sorted(order[:n])
    have = set(kept)
    missing = sorted((u for u in range(scores.numel()) if u not in have),
                     key=lambda u: float(scores[u]), reverse=True)
    return sorted(kept + missing[:n - len(kept)])


__all__ = ["align_masks", "AlignReport"]
