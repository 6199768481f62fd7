"""What to keep in each layer: the common currency of pruners, surgery and the golden tests.

Indices are *kept* indices relative to the layer's *current* shape (so a mask applies to a
dense or an already-pruned model alike); ``None`` keeps everything on that axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ecospa_deploy.spec import LayerSpec, SpecError

Dims = Sequence[int] | Sequence[Sequence[int]]


@dataclass
class LayerMask:
    """Kept indices of one layer.

    q_heads:  kept query heads. Every kept KV head must keep the same number of query heads
              (equal GQA groups); a query head whose KV head is dropped must be dropped.
    kv_heads: kept KV heads (for MHA models such as GPT-2, leave ``None``: it follows q_heads).
    qk_dims:  kept query/key dims inside a head, either one list for every kept KV head or one
              list per kept KV head (equal lengths). With RoPE the set must be pair-closed: dim
              ``p`` (``p < d/2``) is kept iff ``p + d/2`` is, ``d`` the current qk_head_dim.
    v_dims:   kept value/output dims inside a head, same forms as qk_dims.
    ffn:      kept FFN neurons.
    """

    q_heads: Sequence[int] | None = None
    kv_heads: Sequence[int] | None = None
    qk_dims: Dims | None = None
    v_dims: Dims | None = None
    ffn: Sequence[int] | None = None

    def is_identity(self) -> bool:
        return all(v is None for v in (self.q_heads, self.kv_heads, self.qk_dims, self.v_dims,
                                       self.ffn))


def _sorted_unique(idx: Sequence[int], size: int, layer: int, name: str) -> list[int]:
    out = sorted({int(i) for i in idx})
    if len(out) != len(idx):
        raise SpecError(f"layer {layer}: mask.{name} has duplicate indices")
    if out and (out[0] < 0 or out[-1] >= size):
        raise SpecError(f"layer {layer}: mask.{name} index out of range [0, {size}): "
                        f"{[i for i in out if i < 0 or i >= size][:5]}")
    return out


@dataclass(frozen=True)
class ResolvedLayerMask:
    """A LayerMask made explicit and checked against a LayerSpec (all lists sorted)."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    qk_dims: tuple[tuple[int, ...], ...]   # one tuple per kept KV head
    v_dims: tuple[tuple[int, ...], ...]
    ffn: tuple[int, ...]

    @property
    def groups(self) -> int:
        return len(self.q_heads) // len(self.kv_heads)


def _per_head(dims: Dims | None, n_kv: int, size: int, layer: int, name: str
              ) -> tuple[tuple[int, ...], ...]:
    if dims is None:
        return tuple(tuple(range(size)) for _ in range(n_kv))
    dims = list(dims)
    if dims and not isinstance(dims[0], int) and hasattr(dims[0], "__len__"):
        if len(dims) != n_kv:
            raise SpecError(f"layer {layer}: mask.{name} has {len(dims)} per-head lists; "
                            f"expected {n_kv} (one per kept KV head)")
        per = [tuple(_sorted_unique(d, size, layer, name)) for d in dims]
    else:
        per = [tuple(_sorted_unique(dims, size, layer, name))] * n_kv
    if len({len(p) for p in per}) != 1:
        raise SpecError(f"layer {layer}: mask.{name} keeps {sorted({len(p) for p in per})} dims "
                        "in different KV heads; a layer stores one head dim (keep equal counts, "
                        "padding a head with zero dims if needed)")
    if not per[0]:
        raise SpecError(f"layer {layer}: mask.{name} keeps no dims; keep at least one")
    return tuple(per)


def resolve(mask: LayerMask | None, spec: LayerSpec, layer: int, rope: bool
            ) -> ResolvedLayerMask:
    """Check ``mask`` against ``spec`` and return it with every axis explicit."""
    mask = mask or LayerMask()
    n_q, n_kv = spec.num_attention_heads, spec.num_key_value_heads
    group = n_q // n_kv
    q = _sorted_unique(mask.q_heads, n_q, layer, "q_heads") if mask.q_heads is not None \
        else list(range(n_q))
    if mask.kv_heads is not None:
        kv = _sorted_unique(mask.kv_heads, n_kv, layer, "kv_heads")
    elif n_q == n_kv:
        kv = list(q)
    else:
        kv = sorted({h // group for h in q})
    if not q or not kv:
        raise SpecError(f"layer {layer}: mask keeps no attention heads; keep at least one")
    orphans = [h for h in q if h // group not in kv]
    if orphans:
        raise SpecError(f"layer {layer}: mask keeps query heads {orphans[:5]} whose KV head is "
                        "dropped; drop them too")
    per_kv = {g: sum(1 for h in q if h // group == g) for g in kv}
    if len(set(per_kv.values())) != 1 or 0 in per_kv.values():
        raise SpecError(f"layer {layer}: mask keeps unequal GQA groups {per_kv} (KV head: query "
                        "heads kept); groups must be equal")
    qk = _per_head(mask.qk_dims, len(kv), spec.qk_head_dim, layer, "qk_dims")
    if rope:
        half = spec.qk_head_dim // 2
        for dims in qk:
            s = set(dims)
            bad = [p for p in dims if (p + half if p < half else p - half) not in s]
            if bad:
                raise SpecError(f"layer {layer}: mask.qk_dims is not pair-closed under RoPE: dims "
                                f"{bad[:5]} lack their rotary partner (p <-> p ± {half})")
    v = _per_head(mask.v_dims, len(kv), spec.v_head_dim, layer, "v_dims")
    ffn = _sorted_unique(mask.ffn, spec.intermediate_size, layer, "ffn") if mask.ffn is not None \
        else list(range(spec.intermediate_size))
    return ResolvedLayerMask(tuple(q), tuple(kv), qk, v, tuple(ffn))


def pairs_to_dims(pairs: Sequence[int], qk_head_dim: int) -> list[int]:
    """Rotary pair indices ``j`` (``0 <= j < d/2``) to the head-dim positions they occupy."""
    half = qk_head_dim // 2
    return sorted([int(j) for j in pairs] + [int(j) + half for j in pairs])
