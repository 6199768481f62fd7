"""Exact zero padding: the one rule surgery, the engine and the vLLM plan share.

Zeros appended to a layer change no logit: zero q/k dims add nothing to q·k, zero v dims meet
zero o_proj columns, a zero gate/up row meets a zero down column, and the query heads of a
zero KV group write through zero o_proj columns. With RoPE a head is stored in rotate-half
layout, so its zeros go to the end of *both* halves (existing pairs stay partners), and every
padded pair reuses frequency 0: it is zero, so whatever rotates it adds nothing to q·k. Padding
is therefore never limited by the rotary dim (docs/DESIGN.md §2).

The module imports no torch (tensors bring their own methods): the vLLM plan and the CLI's
argument checks use its shape rules and must stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ecospa_deploy.spec import LayerSpec, SpecError, qk_norm_heads

if TYPE_CHECKING:
    import torch

# A layer's canonical projections: {q, k, v, o, [gate,] up, down: (weight [out, in], bias)},
# plus {q_norm, k_norm: (weight [rows * qk_head_dim], None)} in q/k-norm (Qwen3) layers.
Canon = dict[str, tuple["torch.Tensor", "torch.Tensor | None"]]


def round_up(n: int, multiple: int | None) -> int:
    """The smallest multiple of ``multiple`` >= ``n``; ``n`` itself for None or a multiple < 2."""
    if multiple is None or multiple < 2:
        return n
    return -(-n // multiple) * multiple


def pad_heads(t: torch.Tensor | None, heads: int, old: int, new: int, dim: int = 0,
              rope: bool = False) -> torch.Tensor | None:
    """Grow each of ``heads`` blocks of ``old`` along ``dim`` to ``new`` with zeros.

    ``rope``: the blocks are in rotate-half layout, so half the zeros go after each half.
    """
    if t is None or new == old:
        return t
    moved = t.movedim(dim, 0)
    rest = moved.shape[1:]
    blocks = moved.reshape(heads, old, *rest)
    out = blocks.new_zeros(heads, new, *rest)
    if rope:                                   # [x | y] -> [x 0 | y 0]
        half = old // 2
        out[:, :half] = blocks[:, :half]
        out[:, new // 2:new // 2 + half] = blocks[:, half:]
    else:
        out[:, :old] = blocks
    return out.reshape(heads * new, *rest).movedim(0, dim)


def pad_axis(t: torch.Tensor | None, size: int, dim: int = 0) -> torch.Tensor | None:
    """Append zeros along ``dim`` up to ``size``."""
    if t is None or t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def padded_layer(layer: LayerSpec, rope_head_dim: int | None, *,
                 qk_head_dim: int | None = None, v_head_dim: int | None = None,
                 intermediate_size: int | None = None, num_key_value_heads: int | None = None,
                 index: int | None = None) -> LayerSpec:
    """``layer`` grown with zeros to these sizes (None keeps a size); what padding produces.

    Added KV groups bring their query heads (the group size is kept). ``rope_head_dim`` is the
    model's rotary dim (None without RoPE); ``index`` names the layer in a ``SpecError``.
    """
    where = f"layer {index}: " if index is not None else ""
    new = {"qk_head_dim": qk_head_dim, "v_head_dim": v_head_dim,
           "intermediate_size": intermediate_size, "num_key_value_heads": num_key_value_heads}
    for name, size in new.items():
        old = getattr(layer, name)
        if size is None:
            new[name] = old
        elif size < old:
            raise SpecError(f"{where}cannot pad {name}={old} down to {size}; targets must be "
                            ">= the layer's")
    qk, n_kv = new["qk_head_dim"], new["num_key_value_heads"]
    rope_kept = None
    if rope_head_dim is not None:
        if qk % 2:
            raise SpecError(f"{where}padded qk_head_dim={qk} is odd; RoPE needs pairs")
        half = qk // 2
        rope_kept = tuple(tuple(kept) + (0,) * (half - len(kept)) for kept in layer.rope_kept)
        rope_kept += ((0,) * half,) * (n_kv - layer.num_key_value_heads)
    group = layer.num_attention_heads // layer.num_key_value_heads
    out = layer.replace(**new, num_attention_heads=n_kv * group, rope_kept=rope_kept)
    out.validate(index, rope_head_dim)
    return out


QK_NORMS = ("q_norm", "k_norm")


def head_norm_per_head(w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """A q/k norm weight as one row per KV head, flat ``[heads * d]`` (a shared row repeats)."""
    return w if w.shape[0] == heads * d else w.repeat(heads)


def head_norm_rows(per_head: torch.Tensor, heads: int, rows: int, index: int | None = None
                   ) -> torch.Tensor:
    """A per-KV-head flat q/k norm weight in the layout of ``rows`` (``qk_norm_heads``): as is,
    or its one shared row, which every real head must agree on (never merged silently)."""
    if rows == heads:
        return per_head
    grid = per_head.reshape(heads, -1)
    if not bool((grid == grid[:1]).all()):
        where = f"layer {index}: " if index is not None else ""
        raise SpecError(f"{where}q/k norm rows differ between KV heads, but the new shape keeps "
                        "every dense q/k dim and stores one shared row; keep a pruned dim or "
                        "pad instead")
    return grid[0].clone()


def pad_canonical(c: Canon, old: LayerSpec, new: LayerSpec, rope: bool,
                  rope_head_dim: int | None = None) -> Canon:
    """The canonical projections ``c`` of ``old`` grown with zeros to ``new`` (a
    ``padded_layer`` of ``old``): head dims per head, then whole KV groups, then FFN neurons.
    q/k norm weights pad like k rows (their layout needs the model's ``rope_head_dim``)."""
    h, hk = old.num_attention_heads, old.num_key_value_heads

    def rows(key: str, heads: int, dims: tuple[int, int], width: int, pairs: bool):
        return tuple(pad_axis(pad_heads(t, heads, *dims, 0, pairs), width)
                     for t in c[key])

    qk = (old.qk_head_dim, new.qk_head_dim)
    v = (old.v_head_dim, new.v_head_dim)
    out: Canon = {"q": rows("q", h, qk, new.q_width, rope),
                  "k": rows("k", hk, qk, new.k_width, rope),
                  "v": rows("v", hk, v, new.v_width, False)}
    w, b = c["o"]
    out["o"] = (pad_axis(pad_heads(w, h, *v, 1), new.o_width, 1), b)
    ffn = new.intermediate_size
    for key in ("gate", "up"):
        if key in c:
            out[key] = tuple(pad_axis(t, ffn) for t in c[key])
    w, b = c["down"]
    out["down"] = (pad_axis(w, ffn, 1), b)
    for key in QK_NORMS:        # like k rows, per KV head (padding rotary pairs ends dense order)
        if key in c:
            w = head_norm_per_head(c[key][0], hk, old.qk_head_dim)
            w = pad_axis(pad_heads(w, hk, *qk, 0, rope), new.k_width)
            out[key] = (head_norm_rows(w, new.num_key_value_heads,
                                       qk_norm_heads(new, rope_head_dim)), None)
    return out


__all__ = ["Canon", "QK_NORMS", "round_up", "pad_heads", "pad_axis", "padded_layer",
           "pad_canonical", "head_norm_per_head", "head_norm_rows"]
