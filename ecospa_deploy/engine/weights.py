"""Engine weights: each layer's projections, exactly zero-padded to aligned sizes and fused.

The engine never runs the HF modules. It reads every layer's canonical projections (same
attribute names in our classes and in stock HF Llama/Mistral/Qwen2/GPT-2), then

- pads each head's q/k dims and v dims to a multiple of ``head_multiple`` and the FFN width to
  a multiple of ``pad_multiple`` with exact zeros (``ecospa_deploy.padding``, the rule surgery
  and the converters use: with RoPE it may pad past the rotary dim),
- fuses ``q|k|v`` and ``gate|up`` into one matrix each, padding the fused output rows to a
  multiple of ``pad_multiple`` (cuBLAS is up to 8× slower on unaligned widths, docs/DESIGN.md §5),
- interleaves pairs that an epilogue combines: each head's rotary pairs ``(p, p + d/2)`` become
  rows ``(2p, 2p+1)`` of q and k (q·k is unchanged when q and k share the permutation; the
  cache stores K in this order), and gate/up rows alternate ``gate_i, up_i``, so one block of
  output rows holds both members of every pair (engine/kernels/linear.py).

q/k-norm layers (Qwen3) keep their norm weights per head (``[heads, 1, d]``, padded with zeros
and pair-interleaved like the q/k rows they scale); the sum of squares is divided by the dense
head dim, so padding and pruning change nothing (``modeling_ecospa_llama.HeadRMSNorm``).

K is kept at the (padded) q/k head dim, not the v head dim, so the KV cache stores what the
pruned model needs and long-context decode reads fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.families import Family, spec_of
from ecospa_deploy.padding import (head_norm_per_head, pad_axis, pad_canonical, padded_layer,
                                   round_up)
from ecospa_deploy.spec import LayerSpec, ModelSpec, rope_dim_index


@dataclass
class LayerWeights:
    """One decoder layer as the engine runs it (padded sizes; sizes named as in ``LayerSpec``)."""

    num_attention_heads: int
    num_key_value_heads: int
    qk_head_dim: int                  # padded q/k head dim (what K is stored at)
    v_head_dim: int                   # padded v head dim
    intermediate_size: int            # padded FFN width
    hidden: int
    softmax_scale: float
    sliding_window: int | None
    qkv_w: torch.Tensor               # [rows (>= q+k+v widths, aligned), hidden]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor                 # [hidden, H * v_head_dim]
    o_b: torch.Tensor | None
    up_w: torch.Tensor                # [2*ffn (gate_i, up_i interleaved) or ffn, hidden]
    up_b: torch.Tensor | None
    down_w: torch.Tensor              # [hidden, ffn]
    down_b: torch.Tensor | None
    norm1: tuple[torch.Tensor, torch.Tensor | None]
    norm2: tuple[torch.Tensor, torch.Tensor | None]
    q_rope: torch.Tensor | None       # [H, qk_head_dim] dense cos/sin columns, pairs interleaved
    k_rope: torch.Tensor | None       # [Hkv, qk_head_dim]; None = no RoPE
    rope_shared: bool                 # every head uses the same positions (gather once)
    gqa: bool = False                 # query heads share KV heads (a plain bool for compile)
    q_norm: torch.Tensor | None = None    # [H, 1, qk_head_dim] per-head q norm (Qwen3), or None
    k_norm: torch.Tensor | None = None    # [Hkv, 1, qk_head_dim]
    qk_norm_divisor: int = 1              # the dense head dim (what the norm divides by)

    def tensors(self) -> list[torch.Tensor]:
        ts = [self.qkv_w, self.qkv_b, self.o_w, self.o_b, self.up_w, self.up_b, self.down_w,
              self.down_b, *self.norm1, *self.norm2, self.q_norm, self.k_norm]
        return [t for t in ts if t is not None]


@dataclass
class ModelWeights:
    family: str                       # the family's name (ecospa_deploy.families)
    spec: ModelSpec                   # the model's own (unpadded) spec
    layers: list[LayerWeights]
    embed: torch.Tensor               # [vocab, hidden]
    pos_embed: torch.Tensor | None    # GPT-2 learned positions [n_positions, hidden]
    final_norm: tuple[torch.Tensor, torch.Tensor | None]
    lm_head: torch.Tensor             # [vocab, hidden] (may be the embedding, tied)
    norm_eps: float
    rms_norm: bool
    act: Any                          # HF activation module (exact same function as HF)
    act_name: str                     # its HF name (the fused kernels compute a few of them)
    gated: bool
    rotary: nn.Module | None          # HF rotary module at the dense head dim
    max_positions: int
    vocab_size: int

    def weight_bytes(self) -> int:
        """Bytes the engine holds for weights (padded), counting a tied head once."""
        seen: set[int] = set()
        total = 0
        ts = [self.embed, self.lm_head, *self.final_norm]
        if self.pos_embed is not None:
            ts.append(self.pos_embed)
        for layer in self.layers:
            ts += layer.tensors()
        for t in ts:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


def _interleave_pairs(w: torch.Tensor | None, heads: int, dim: int) -> torch.Tensor | None:
    """Per head block of ``d`` rows along ``dim``: order ``0, d/2, 1, d/2+1, ...``."""
    if w is None:
        return w
    moved = w.movedim(dim, 0)
    d = moved.shape[0] // heads
    blocks = moved.reshape(heads, 2, d // 2, *moved.shape[1:]).transpose(1, 2)
    return blocks.reshape(heads * d, *moved.shape[1:]).movedim(0, dim)


def _interleave_rows(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``a_0, b_0, a_1, b_1, ...`` (gate/up pairs)."""
    if a is None:
        return None
    return torch.stack([a, b], 1).reshape(2 * a.shape[0], *a.shape[1:])


def _norm_tensors(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return mod.weight.detach(), getattr(mod, "bias", None)


def _rope_positions(layer: LayerSpec, rope_head_dim: int) -> torch.Tensor:
    """[Hkv, qk_head_dim] columns of the dense cos/sin tables each KV head's dims rotate with."""
    return torch.tensor([rope_dim_index(kept, rope_head_dim) for kept in layer.rope_kept],
                        dtype=torch.long)


def _layer_weights(layer_mod: nn.Module, layer: LayerSpec, family: Family,
                   rope_head_dim: int | None, gated: bool, head_multiple: int, pad_multiple: int, dtype, device
                   ) -> LayerWeights:
    rope = rope_head_dim is not None
    c = {k: (w.detach(), None if b is None else b.detach())
         for k, (w, b) in family.canonical(layer_mod).items()}
    padded = padded_layer(layer, rope_head_dim,
                          qk_head_dim=round_up(layer.qk_head_dim, head_multiple),
                          v_head_dim=round_up(layer.v_head_dim, head_multiple),
                          intermediate_size=round_up(layer.intermediate_size, pad_multiple))
    c = pad_canonical(c, layer, padded, rope, rope_head_dim)
    H, Hkv, ffn = layer.num_attention_heads, layer.num_key_value_heads, padded.intermediate_size
    qk_norms = {}
    for key, heads in (("q_norm", H), ("k_norm", Hkv)):
        if key in c:        # per KV head, pairs interleaved like k, then one row per head
            w = head_norm_per_head(c[key][0], Hkv, padded.qk_head_dim)
            w = _interleave_pairs(w, Hkv, 0) if rope else w
            w = w.view(Hkv, 1, padded.qk_head_dim).repeat_interleave(heads // Hkv, dim=0)
            qk_norms[key] = w
    (qw, qb), (kw, kb), (vw, vb) = c["q"], c["k"], c["v"]
    if rope:
        qw, qb = _interleave_pairs(qw, H, 0), _interleave_pairs(qb, H, 0)
        kw, kb = _interleave_pairs(kw, Hkv, 0), _interleave_pairs(kb, Hkv, 0)
    rows = round_up(qw.shape[0] + kw.shape[0] + vw.shape[0], pad_multiple)
    qkv_w = pad_axis(torch.cat([qw, kw, vw], 0), rows)
    qkv_b = None if qb is None else pad_axis(torch.cat([qb, kb, vb], 0), rows)
    o_w, ob = c["o"]
    up_w, up_b = c["up"]
    if gated:
        up_w = _interleave_rows(c["gate"][0], up_w)
        up_b = _interleave_rows(c["gate"][1], up_b)
    down_w, db = c["down"]
    q_rope = k_rope = None
    shared = False
    if rope:
        k_rope = _interleave_pairs(_rope_positions(padded, rope_head_dim), 1, 1)
        q_rope = k_rope.repeat_interleave(H // Hkv, dim=0)
        shared = bool((k_rope == k_rope[:1]).all())
        k_rope, q_rope = k_rope.to(device), q_rope.to(device)
    norm1, norm2 = (_norm_tensors(m) for m in family.norms(layer_mod))

    def put(t):
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    return LayerWeights(
        num_attention_heads=H, num_key_value_heads=Hkv, qk_head_dim=padded.qk_head_dim,
        v_head_dim=padded.v_head_dim, intermediate_size=ffn, hidden=o_w.shape[0],
        softmax_scale=layer.softmax_scale, sliding_window=layer.sliding_window,
        qkv_w=put(qkv_w), qkv_b=put(qkv_b), o_w=put(o_w), o_b=put(ob), up_w=put(up_w),
        up_b=put(up_b), down_w=put(down_w), down_b=put(db),
        norm1=(put(norm1[0]), put(norm1[1])), norm2=(put(norm2[0]), put(norm2[1])),
        q_rope=q_rope, k_rope=k_rope, rope_shared=shared, gqa=H != Hkv,
        q_norm=put(qk_norms.get("q_norm")), k_norm=put(qk_norms.get("k_norm")),
        qk_norm_divisor=rope_head_dim or 1)


@torch.no_grad()
def build_weights(model: nn.Module, *, dtype: torch.dtype, device: torch.device,
                  head_multiple: int = 8, pad_multiple: int = 64) -> ModelWeights:
    """Padded, fused engine weights of ``model`` (ours or stock HF), on ``device`` in ``dtype``."""
    from transformers.activations import ACT2FN

    family, spec = spec_of(model)
    config = model.config
    layers_mod = family.decoder_layers(model)
    if len(layers_mod) != spec.num_layers:
        raise UnsupportedError(f"model has {len(layers_mod)} decoder layers but its spec lists "
                               f"{spec.num_layers}; expected one spec per layer")
    rope_head_dim = spec.rope_head_dim
    layers = [_layer_weights(mod, layer, family, rope_head_dim, spec.gated_mlp, head_multiple,
                             pad_multiple, dtype, device)
              for mod, layer in zip(layers_mod, spec.layers)]

    def put(t):
        return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

    parts = family.parts(model)
    embed = put(parts.embed.weight)
    pos = None if parts.positions is None else put(parts.positions.weight)
    final = tuple(put(t) for t in _norm_tensors(parts.final_norm))
    act_name = family.activation(config)
    tied = model.lm_head.weight.data_ptr() == parts.embed.weight.data_ptr()
    lm_head = embed if tied else put(model.lm_head.weight)
    return ModelWeights(family=family.name, spec=spec, layers=layers, embed=embed,
                        pos_embed=pos, final_norm=final, lm_head=lm_head,
                        norm_eps=family.norm_eps(config), rms_norm=spec.norm == "rmsnorm",
                        act=ACT2FN[act_name], act_name=act_name, gated=spec.gated_mlp,
                        rotary=parts.rotary, max_positions=family.max_positions(config),
                        vocab_size=embed.shape[0])
