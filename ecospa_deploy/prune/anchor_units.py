"""Whole attention heads and FFN channels: the structural units of the anchor methods.

Wanda-sp, FLAP and LLM-Pruner remove whole heads (``q``/``k``/``v`` rows and ``o`` columns of
a head) and FFN channels (``gate``/``up`` rows and the ``down`` column); they never shorten a
head. This module holds what the three share: the head units under GQA, the per-layer *shape*
(counts) a selection leaves and its parameter count, the uniform-ratio solve of the two
uniform methods, the top-k selection and the ``LayerMask`` a selection becomes.

**Heads under GQA** (``heads=``). A query head alone holds its ``q`` rows and ``o`` columns; its
``k``/``v`` rows belong to its KV head, shared by the group. Two unit kinds, chosen per call:

- ``"groups"`` (default): a unit is a whole KV group (the KV head and its query heads). It is
  the unit that shrinks the KV cache, and what LLM-Pruner's GQA support (k_proj as the root of
  the attention group) and the GQA ports of FLAP remove. With few groups it is coarse
  (SmolLM2-135M: 3 groups of 3 query heads per layer, so a layer keeps 1/3, 2/3 or all of its
  attention), and a single-group layer (MQA) cannot lose attention at all (floors keep one
  group).
- ``"query"``: a unit is one query head *in every group*: each group drops the same number of
  its own lowest-scored query heads (groups stay equal, as the format requires) and every KV
  head is kept, so the KV cache does not shrink; finer, and the only way to thin MQA layers.

In a layer whose groups hold one query head (MHA: GPT-2, or Llama with as many KV as query
heads) a head is a group and both modes are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.tracking import ParamCounter
from ecospa_deploy.spec import LayerSpec

HEAD_UNITS = ("groups", "query")


def check_heads(heads: str) -> str:
    if heads not in HEAD_UNITS:
        raise EcospaError(f"heads={heads!r} is not supported; expected one of {list(HEAD_UNITS)} "
                          "(whole KV groups, or the same number of query heads from every group)")
    return heads


def group_size(lspec: LayerSpec) -> int:
    return lspec.num_attention_heads // lspec.num_key_value_heads


def head_mode(lspec: LayerSpec, heads: str) -> str:
    """The unit kind of one layer: ``"query"`` only where a group holds several query heads."""
    return "query" if heads == "query" and group_size(lspec) > 1 else "groups"


@dataclass(frozen=True)
class Shape:
    """What a layer keeps, as counts: KV groups, query heads per group, FFN channels."""

    groups: int
    per_group: int
    ffn: int

    @classmethod
    def of(cls, lspec: LayerSpec) -> "Shape":
        return cls(lspec.num_key_value_heads, group_size(lspec), lspec.intermediate_size)

    def spec(self, lspec: LayerSpec, **flags: bool) -> LayerSpec:
        """``lspec`` reshaped to these counts (for parameter counting; ``flags``: bias flags)."""
        return lspec.replace(num_attention_heads=self.groups * self.per_group,
                             num_key_value_heads=self.groups, intermediate_size=self.ffn,
                             rope_kept=None, **flags)


def _keep(n: int, r: float, floor: int) -> int:
    """Units left after removing ``int(r·n)`` of ``n`` (the originals' rounding), never below
    ``floor`` (nor below what is there)."""
    return max(min(floor, n), n - int(r * n + 1e-9))


def shape_at(lspec: LayerSpec, i: int, heads: str, floors: Floors, r_heads: float,
             r_ffn: float) -> Shape:
    """The shape of layer ``i`` after removing fraction ``r_heads`` of its head units and
    ``r_ffn`` of its FFN channels, within its floors."""
    full = Shape.of(lspec)
    groups, per_group = full.groups, full.per_group
    if head_mode(lspec, heads) == "query":
        per_group = _keep(per_group, r_heads, 1)
    else:
        groups = _keep(groups, r_heads, floors.kv_groups)
    return Shape(groups, per_group, _keep(full.ffn, r_ffn, floors(i, "ffn")))


def _bracket(f: Callable[[float], int], target: int) -> tuple[float, float]:
    """``(lo, hi)`` around the step of a non-increasing ``f`` on [0, 1] where it crosses
    ``target``: ``f(lo) > target >= f(hi)`` (bisection; the ends where it does not cross)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _closest(f: Callable[[float], int], target: int) -> float:
    lo, hi = _bracket(f, target)
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


def uniform_shapes(model: nn.Module, target: int, floors: Floors, heads: str,
                   layers: Sequence[int], method: str) -> tuple[list[Shape], float]:
    """Per-layer shapes with one pruning ratio in every layer of ``layers`` (others untouched),
    for ``target`` parameters: (shapes, ratio).

    The ratio is solved for heads and FFN together; whole heads move the count in steps (a
    KV group of a 4-group layer is a quarter of its attention), so the FFN ratio is then
    re-solved alone, with the heads fixed, to land on the target: the FFN absorbs the rounding
    of whole heads (where the FFN, at its floors or whole, cannot, the head ratio moves to the
    nearest one it can absorb)."""
    spec = model.config.ecospa_spec
    counter = ParamCounter(model)
    pruned = set(layers)

    def shapes(r_heads: float, r_ffn: float) -> list[Shape]:
        return [shape_at(l, i, heads, floors, r_heads, r_ffn) if i in pruned else Shape.of(l)
                for i, l in enumerate(spec.layers)]

    def total(s: list[Shape]) -> int:
        return counter.total([x.spec(l) for x, l in zip(s, spec.layers)])

    smallest = total(shapes(1.0, 1.0))
    if smallest > target:
        raise floors.unreachable(target, smallest, method)
    r = _closest(lambda x: total(shapes(x, x)), target)
    if total(shapes(r, 1.0)) > target:     # FFN floors cannot absorb the heads' rounding:
        r = _bracket(lambda x: total(shapes(x, 1.0)), target)[1]       # fewer heads kept
    elif total(shapes(r, 0.0)) < target:   # nor a whole FFN: more heads kept
        r = _bracket(lambda x: total(shapes(x, 0.0)), target - 1)[0]
    r_ffn = _closest(lambda x: total(shapes(r, x)), target)
    return shapes(r, r_ffn), r


@dataclass
class Selection:
    """Kept units of one layer (current indices): KV groups, per kept group its kept query
    heads (0 ≤ j < group size), FFN channels."""

    groups: list[int]
    heads: list[list[int]]
    ffn: list[int]

    def mask(self, lspec: LayerSpec) -> LayerMask:
        g = group_size(lspec)
        q = [k * g + j for k, kept in zip(self.groups, self.heads) for j in kept]
        mha = lspec.num_attention_heads == lspec.num_key_value_heads
        return LayerMask(q_heads=q, kv_heads=None if mha else list(self.groups),
                         ffn=list(self.ffn))


def top(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` largest scores, sorted."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:n].tolist())


def select(shape: Shape, group_scores: torch.Tensor, head_scores: torch.Tensor,
           ffn_scores: torch.Tensor) -> Selection:
    """The highest-scored units that fill ``shape``: ``group_scores[n_kv]``,
    ``head_scores[n_kv, group]`` (each group keeps its own best heads), ``ffn_scores[ffn]``."""
    groups = top(group_scores, shape.groups)
    heads = [top(head_scores[k], shape.per_group) for k in groups]
    return Selection(groups, heads, top(ffn_scores, shape.ffn))


__all__ = ["HEAD_UNITS", "check_heads", "group_size", "head_mode", "Shape", "shape_at",
           "uniform_shapes", "Selection", "top", "select"]
