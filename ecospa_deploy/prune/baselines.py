"""Baselines for honest comparison: structured ``magnitude`` and ``uncoupled`` (EcoSpa Appendix A).

Both keep the same fraction ``r`` of units in every block of every layer (q/k units per KV
group, v dims per KV group, FFN neurons), ``r`` solved so the model lands on the target
parameter count (no block below its floor, ``floors.Floors``); they differ only in *which*
units survive:

- ``magnitude``: a unit's score is the squared L2 norm of every weight it owns in both matrices
  (``‖q‖²+‖k‖²``, ``‖v‖²+‖o‖²``, ``‖gate‖²+‖up‖²+‖down‖²``); the lowest go, aligned.
- ``uncoupled`` (Appendix A, "individual sparsification"): each matrix of a coupled pair keeps
  its own largest-norm rows/columns *independently*, so ``W1`` keeps set ``S1`` and ``W2`` keeps
  ``S2``; the survivors are paired in order, which re-pairs unrelated rows and columns (the
  "mismatch effect"). We realise it as a weight rewrite (``W2``'s rows ``S2`` are moved into
  positions ``S1``) followed by an ordinary aligned mask ``S1``, so the result is still a mask
  of the rewritten model and passes the golden invariant against it.

``uniform_masks`` exposes the per-block fractions directly (the Table 8 experiment prunes the FFN
only, coupled vs uncoupled).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.units import BLOCKS, layer_norms, shrink, unit_counts

Scorer = Literal["coupled", "magnitude", "uncoupled"]


def _kept(n: int, r: float, floor: int = 1) -> int:
    return max(min(floor, n), 1, min(n, round(r * n)))


def _specs_at(spec, ratios: dict[str, float], floors: Floors):
    out = []
    for i, layer in enumerate(spec.layers):
        units = unit_counts(layer, spec.rope)
        for block, r in ratios.items():
            layer = shrink(layer, block, _kept(units[block], r, floors(i, block)), spec.rope)
        out.append(layer)
    return out


def solve_ratio(model: nn.Module, target: int, blocks=BLOCKS, floors: Floors | None = None,
                method: str = "uniform") -> float:
    """The uniform keep fraction whose parameter count is closest to ``target`` (bisection);
    no block goes below its floor."""
    spec = model.config.ecospa_spec
    floors = floors or Floors.of(spec)
    counter = ParamCounter(model)
    lo, hi = 0.0, 1.0
    smallest = counter.total(_specs_at(spec, {b: 0.0 for b in blocks}, floors))
    if smallest > target:
        raise floors.unreachable(target, smallest, method)
    for _ in range(50):
        mid = (lo + hi) / 2
        if counter.total(_specs_at(spec, {b: mid for b in blocks}, floors)) > target:
            hi = mid
        else:
            lo = mid
    below = counter.total(_specs_at(spec, {b: lo for b in blocks}, floors))
    above = counter.total(_specs_at(spec, {b: hi for b in blocks}, floors))
    return lo if abs(below - target) <= abs(above - target) else hi


def _magnitude(c, lspec, rope: bool) -> dict[str, torch.Tensor]:
    """Per block ``[groups, units]``: squared norm of all weights a unit owns."""
    n_q, n_kv = lspec.num_attention_heads, lspec.num_key_value_heads
    group = n_q // n_kv

    def rows(key):
        w, b = c[key]
        w = w.detach().float().pow(2).sum(1)
        return w if b is None else w + b.detach().float().pow(2)

    q = rows("q").view(n_kv, group, -1).sum(1)
    k = rows("k").view(n_kv, -1)
    v = rows("v").view(n_kv, -1)
    o = c["o"][0].detach().float().pow(2).sum(0).view(n_kv, group, -1).sum(1)
    ffn = sum(rows(key) for key in ("gate", "up") if key in c) + \
        c["down"][0].detach().float().pow(2).sum(0)
    qk = q + k
    if rope:
        half = qk.shape[1] // 2
        qk = qk[:, :half] + qk[:, half:]
    return {"qk": qk, "vo": v + o, "ffn": ffn.view(1, -1)}


def _top(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True)[:n].tolist())


@torch.no_grad()
def _repair(c, lspec, rope: bool, block: str, g: int, s1: list[int], s2: list[int]) -> None:
    """Move ``W2``'s units ``s2`` into positions ``s1`` (uncoupled pairing), in place."""
    if s1 == s2:
        return
    n_q, n_kv = lspec.num_attention_heads, lspec.num_key_value_heads
    group = n_q // n_kv
    if block == "ffn":
        w = c["down"][0]
        w[:, s1] = w[:, s2].clone()
        return
    if block == "vo":
        w, dv = c["o"][0], lspec.v_head_dim
        for h in range(g * group, (g + 1) * group):
            w[:, [h * dv + j for j in s1]] = w[:, [h * dv + j for j in s2]].clone()
        return
    d = lspec.qk_head_dim
    if rope:
        s1 = s1 + [j + d // 2 for j in s1]
        s2 = s2 + [j + d // 2 for j in s2]
    w, b = c["k"]
    dst, src = [g * d + j for j in s1], [g * d + j for j in s2]
    w[dst] = w[src].clone()
    if b is not None:
        b[dst] = b[src].clone()


def uniform_masks(model: nn.Module, ratios: dict[str, float], scorer: Scorer,
                  floors: Floors | None = None) -> list[LayerMask]:
    """Keep fraction ``ratios[block]`` of every block's units (never below ``floors``; default
    one unit), chosen by ``scorer``.

    ``scorer="uncoupled"`` rewrites ``W2`` weights of ``model`` in place (see module docstring).
    """
    spec = model.config.ecospa_spec
    kept = KeptIndices.identity(spec)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        c = layer.canonical()
        units = unit_counts(lspec, spec.rope)
        norms = layer_norms(c, lspec, spec.rope)
        mags = _magnitude(c, lspec, spec.rope) if scorer == "magnitude" else None
        n_kv = lspec.num_key_value_heads
        keep = LayerKeep(groups=list(range(n_kv)), qk=[], vo=[], ffn=[])
        for block in BLOCKS:
            n = _kept(units[block], ratios.get(block, 1.0), floors(i, block) if floors else 1)
            groups = 1 if block == "ffn" else n_kv
            chosen = []
            for g in range(groups):
                if scorer == "coupled":
                    s1 = _top(norms.coupled(block).view(groups, -1)[g], n)
                elif scorer == "magnitude":
                    s1 = _top(mags[block][g], n)
                else:
                    s1 = _top(norms.side(block, 1).view(groups, -1)[g], n)
                    s2 = _top(norms.side(block, 2).view(groups, -1)[g], n)
                    _repair(c, lspec, spec.rope, block, g, s1, s2)
                chosen.append(s1)
            if block == "ffn":
                keep.ffn = chosen[0]
            else:
                setattr(keep, block, chosen)
        kept.apply(i, lspec, keep)
    return kept.masks()


def prune_uniform(model: nn.Module, target: int, scorer: Scorer, floors: Floors | None = None
                  ) -> tuple[list[LayerMask], float]:
    """Magnitude or uncoupled pruning to ``target`` parameters: (masks, keep fraction)."""
    floors = floors or Floors.of(model.config.ecospa_spec)
    r = solve_ratio(model, target, floors=floors, method=scorer)
    return uniform_masks(model, {b: r for b in BLOCKS}, scorer, floors), r


__all__ = ["uniform_masks", "prune_uniform", "solve_ratio"]
