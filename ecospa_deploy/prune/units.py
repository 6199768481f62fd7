"""The prunable units of one decoder layer and their coupled (aligned) row/column pairs.

Every pruner in this package speaks in three kinds of *blocks* per layer:

- ``qk``: per KV group ``g``, the aligned dims shared by ``W_Q`` of the group's query heads and
  ``W_K`` of head ``g`` (``W_QK = W_Q W_Kᵀ``). With RoPE the unit is a rotary *pair*
  ``(j, j + d/2)``: the rotation mixes the two dims, so a pair is kept or removed whole, and
  pair norms are rotation invariant (EcoSpa footnote 3: the position matrices enter the score,
  the removal acts on ``W_Q``/``W_K``).
- ``vo``: per KV group ``g``, the aligned dims of ``W_V`` (head ``g``) and ``W_O`` (columns of the
  group's query heads); removing one drops it from the whole group (GQA).
- ``ffn``: per layer, neuron ``j`` couples row ``j`` of ``W_gate ⊙ W_up`` (or ``W_in``) with column
  ``j`` of ``W_down`` (EcoSpa footnote 2).

Scores are computed from a layer's canonical projections (``layer.canonical()``: ``[out, in]``
weights and biases), so one implementation serves the Llama family and GPT-2. Biases are
included as one more input column of the unit they belong to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ecospa_deploy.padding import Canon
from ecospa_deploy.spec import LayerSpec

BLOCKS = ("qk", "vo", "ffn")


def _rows(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[out, in(+1)]``: the weight with its bias appended as a last input column."""
    w = w.detach().float()
    return w if b is None else torch.cat([w, b.detach().float()[:, None]], dim=1)


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2)


@dataclass
class LayerNorms:
    """Squared L2 norms of each side of every aligned unit of one layer.

    ``qk1[g, u]``/``qk2[g, u]``: unit ``u`` (dim, or rotary pair with RoPE) of KV group ``g`` on the
    query side (all query heads of the group) and the key side. ``vo1``/``vo2`` likewise for
    value (``W_V`` rows) and output (``W_O`` columns of the group's heads). ``ffn1[j]``/``ffn2[j]``
    for the FFN (gate⊙up row, down column).
    """

    qk1: torch.Tensor
    qk2: torch.Tensor
    vo1: torch.Tensor
    vo2: torch.Tensor
    ffn1: torch.Tensor
    ffn2: torch.Tensor

    def side(self, block: str, which: int) -> torch.Tensor:
        return getattr(self, f"{block}{which}")

    def coupled(self, block: str) -> torch.Tensor:
        """Eq. 10 numerator: ``‖col_j(W1)‖ · ‖row_j(W2)‖`` per unit."""
        return (self.side(block, 1) * self.side(block, 2)).sqrt()


def _pairs(x: torch.Tensor, rope: bool) -> torch.Tensor:
    """Sum a ``[..., d]`` tensor of per-dim squares into rotary pairs ``[..., d/2]`` under RoPE."""
    if not rope:
        return x
    half = x.shape[-1] // 2
    return x[..., :half] + x[..., half:]


def layer_norms(c: Canon, spec: LayerSpec, rope: bool) -> LayerNorms:
    """Squared norms of every unit side of a layer from its canonical projections."""
    n_q, n_kv = spec.num_attention_heads, spec.num_key_value_heads
    group, dqk, dv = n_q // n_kv, spec.qk_head_dim, spec.v_head_dim
    q = _sq(_rows(*c["q"])).sum(1).view(n_kv, group, dqk).sum(1)
    k = _sq(_rows(*c["k"])).sum(1).view(n_kv, dqk)
    v = _sq(_rows(*c["v"])).sum(1).view(n_kv, dv)
    o = _sq(c["o"][0].detach().float()).sum(0).view(n_kv, group, dv).sum(1)
    down = _sq(c["down"][0].detach().float()).sum(0)
    if "gate" in c:
        w1 = _rows(*c["gate"]) * _rows(*c["up"])
    else:
        w1 = _rows(*c["up"])
    ffn1 = _sq(w1).sum(1)
    return LayerNorms(qk1=_pairs(q, rope), qk2=_pairs(k, rope), vo1=v, vo2=o, ffn1=ffn1,
                      ffn2=down)


def activation_norms(c: Canon, spec: LayerSpec, rope: bool, stats) -> LayerNorms:
    """Eq. 10 with its data term kept exact: the squared norms of what each side of a unit
    *computes* on the calibration data, not of its weights.

    EcoSpa's Eq. 9 bounds a unit's error by ``‖X‖_F·‖w1_j‖·‖w2_j‖``; the weight norms are the
    bound's only unit-dependent part, and they ignore what the input does to each weight (an
    RMSNorm gain of 30 on one channel, or the few channels that carry massive activations). The
    exact term is ``‖X w1_j‖·‖w2_j‖``: here ``‖X w1_j‖²`` is ``w1_j Σ w1_jᵀ`` (``Σ`` the attention
    input's second moment) for query and key dims, the measured energy of the o_proj input
    channel for value dims (the head output after attention mixing, summed over the group's
    query heads with their W_O columns) and of the FFN activation ``act(gate_j)·up_j`` for
    FFN neurons. ``stats`` is the layer's ``activations.LayerStats``.
    """
    n_q, n_kv = spec.num_attention_heads, spec.num_key_value_heads
    group, dqk, dv = n_q // n_kv, spec.qk_head_dim, spec.v_head_dim
    sigma = stats.attn.second.float()

    def data(key: str) -> torch.Tensor:
        w = _rows(*c[key])
        if w.shape[1] != sigma.shape[0]:          # a bias column: x gains a constant 1
            w, b = w[:, :-1], w[:, -1]
            mu = stats.attn.mean.float()
            return ((w @ sigma) * w).sum(1) + 2 * b * (w @ mu) + b * b
        return ((w @ sigma) * w).sum(1)

    q = data("q").view(n_kv, group, dqk).sum(1)
    k = data("k").view(n_kv, dqk)
    o = _sq(c["o"][0].detach().float()).sum(0)
    vo = (stats.o.energy.float() * o).view(n_kv, group, dv).sum(1)
    ffn = stats.down.energy.float() * _sq(c["down"][0].detach().float()).sum(0)
    one = torch.ones_like
    return LayerNorms(qk1=_pairs(q, rope), qk2=_pairs(k, rope), vo1=vo, vo2=one(vo), ffn1=ffn,
                      ffn2=one(ffn))


def layer_fisher(f: Canon, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Eq. 8 per coupled matrix pair: mean of the two component matrices' mean squared gradient.

    ``f`` holds accumulated squared gradients in canonical layout. Returns ``qk[g]``, ``vo[g]``
    (one value per KV group) and ``ffn`` (a 1-element tensor for the layer's FFN pair, with
    ``W_gate`` and ``W_up`` counted together as ``W1``).
    """
    n_q, n_kv = spec.num_attention_heads, spec.num_key_value_heads
    def per_group(rows: torch.Tensor, heads: int) -> torch.Tensor:
        """Mean over each head's rows, then over the heads of each KV group."""
        return rows.detach().float().reshape(heads, -1).mean(1).view(n_kv, -1).mean(1)

    q = per_group(_rows(*f["q"]), n_q)
    k = per_group(_rows(*f["k"]), n_kv)
    v = per_group(_rows(*f["v"]), n_kv)
    o = per_group(f["o"][0].t(), n_q)
    w1 = [_rows(*f[key]) for key in ("gate", "up") if key in f]
    ffn1 = torch.cat([w.flatten() for w in w1]).mean()
    ffn2 = f["down"][0].detach().float().mean()
    return {"qk": 0.5 * (q + k), "vo": 0.5 * (v + o), "ffn": (0.5 * (ffn1 + ffn2)).view(1)}


def canonical_of(layer: nn.Module, values: dict[str, torch.Tensor]) -> Canon:
    """``layer.canonical()`` laid over other tensors shaped like its parameters (grads, moments).

    A throw-away copy of the layer gets ``values[name]`` as its parameters, so the family's own
    weight-name mapping (fused ``c_attn``, Conv1D transposes) applies unchanged.
    """
    shadow = copy.deepcopy(layer)
    for name, p in shadow.named_parameters():
        p.data = values[name]
    return shadow.canonical()


def unit_counts(spec: LayerSpec, rope: bool) -> dict[str, int]:
    """Units per group in each block: rotary pairs (RoPE) or dims for qk; dims for vo; neurons."""
    return {"qk": spec.qk_head_dim // 2 if rope else spec.qk_head_dim,
            "vo": spec.v_head_dim, "ffn": spec.intermediate_size}


def shrink(spec: LayerSpec, block: str, units: int, rope: bool) -> LayerSpec:
    """``spec`` with ``units`` kept per group in ``block`` (shape only; rope_kept dropped)."""
    if block == "qk":
        return spec.replace(qk_head_dim=units * 2 if rope else units, rope_kept=None)
    if block == "vo":
        return spec.replace(v_head_dim=units, rope_kept=None)
    return spec.replace(intermediate_size=units, rope_kept=None)


__all__ = ["BLOCKS", "LayerNorms", "layer_norms", "activation_norms", "layer_fisher", "canonical_of", "unit_counts",
           "shrink"]
