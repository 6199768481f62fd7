"""Per-layer floors: the smallest width every pruner may leave in a layer (never degenerate).

By default a layer keeps at least ``min_keep = 1/8`` of its *dense* FFN width, of its dense
q/k head dim (whole rotary pairs under RoPE) and of its dense v head dim, and at least one KV
group; "dense" is the shape the model was first pruned from (``ModelSpec.dense``), so a
second pruning pass cannot creep below the floors either. A layer already narrower than a
floor is left as it is on that axis (the floor becomes its current width). ``min_keep=0``
restores the old limit of one unit per block.

Every method (ecospa, numerical, uncoupled, magnitude) and ``--align`` asks ``Floors`` how
far it may go, and an unreachable target raises an error that names the floor that stops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.units import BLOCKS, shrink, unit_counts
from ecospa_deploy.spec import LayerSpec, ModelSpec

DEFAULT_MIN_KEEP = 0.125


def check_min_keep(min_keep: float) -> float:
    if not (isinstance(min_keep, (int, float)) and 0 <= min_keep < 1):
        raise EcospaError(f"min_keep={min_keep!r} is invalid; expected a fraction of the dense "
                          "widths in [0, 1) (0.125 keeps at least 1/8 of every layer's FFN, q/k "
                          "and v head dims; 0 allows one unit)")
    return float(min_keep)


@dataclass(frozen=True)
class Floors:
    """Minimum units per block of every layer (q/k in rotary pairs under RoPE)."""

    min_keep: float
    units: tuple[dict[str, int], ...]      # per layer: {"qk", "vo", "ffn"} minimum units
    kv_groups: int = 1

    @classmethod
    def of(cls, spec: ModelSpec, min_keep: float = DEFAULT_MIN_KEEP) -> "Floors":
        min_keep = check_min_keep(min_keep)
        dense = spec.dense
        dense_units = {"qk": dense.head_dim // 2 if spec.rope else dense.head_dim,
                       "vo": dense.head_dim, "ffn": dense.intermediate_size}
        out = []
        for layer in spec.layers:
            now = unit_counts(layer, spec.rope)
            out.append({b: min(now[b], max(1, math.ceil(min_keep * dense_units[b])))
                        for b in BLOCKS})
        return cls(min_keep, tuple(out))

    def raised(self, spec: ModelSpec, block: str, min_keep: float) -> "Floors":
        """These floors with ``block``'s raised to ``min_keep`` of the dense width (a layer
        already narrower keeps its width as floor)."""
        dense = spec.dense
        n = {"qk": dense.head_dim // 2 if spec.rope else dense.head_dim, "vo": dense.head_dim,
             "ffn": dense.intermediate_size}[block]
        units = []
        for layer, u in zip(spec.layers, self.units):
            now = unit_counts(layer, spec.rope)[block]
            units.append({**u, block: max(u[block], min(now, math.ceil(min_keep * n)))})
        return Floors(self.min_keep, tuple(units), self.kv_groups)

    def __call__(self, layer: int, block: str) -> int:
        return self.units[layer][block]

    def smallest(self, spec: ModelSpec, heads: bool = False) -> list[LayerSpec]:
        """Every layer at its floors; with ``heads`` also down to ``kv_groups`` KV groups."""
        out = []
        for i, layer in enumerate(spec.layers):
            if heads and layer.num_key_value_heads > self.kv_groups:
                group = layer.num_attention_heads // layer.num_key_value_heads
                layer = layer.replace(num_key_value_heads=self.kv_groups,
                                      num_attention_heads=self.kv_groups * group, rope_kept=None)
            for block in BLOCKS:
                layer = shrink(layer, block, self.units[i][block], spec.rope)
            out.append(layer)
        return out

    def describe(self) -> str:
        return (f"every layer keeps >= {self.min_keep:g} of its dense FFN width, q/k head dim and "
                f"v head dim and >= {self.kv_groups} KV group (--min-keep {self.min_keep:g})")

    def unreachable(self, target: int, smallest: int, method: str) -> EcospaError:
        return EcospaError(
            f"{method}: target of {target:,} parameters is below the smallest model the floors "
            f"allow ({smallest:,} parameters: {self.describe()}); choose a larger --target-size "
            "or a smaller --min-keep")


__all__ = ["DEFAULT_MIN_KEEP", "Floors", "check_min_keep"]
