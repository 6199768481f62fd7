"""A pruned model's weights as the tensors of a llama.cpp ``deci`` GGUF (float32, exact).

Per layer (``plan`` gives the shapes):

- q/k: each head back to the rotary dim ``d``; a kept pair ``(j, j + d/2)`` of HF's rotate-half
  layout lands at slots ``(2j, 2j+1)``, the adjacent-pair layout llama.cpp's rope (mode 0)
  rotates at frequency ``j``; pruned pairs are zero. The softmax scale llama.cpp applies is
  ``1/sqrt(d)``: a layer whose spec keeps another scale has the ratio folded into W_q (and its
  bias), so q·k·scale is unchanged.
- v: each head zero-padded to ``d``; o_proj's input columns likewise, per query head.
- FFN: gate/up rows and down_proj columns zero-padded to the plan's width.
- RoPE scalings that are a factor per frequency (llama3, linear) become ``rope_freqs``
  (llama.cpp divides each frequency by it).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ecospa_deploy.families import Family
from ecospa_deploy.padding import pad_axis, pad_heads
from ecospa_deploy.spec import LayerSpec, ModelSpec

from .plan import GGUFPlan


def rope_slots(t: torch.Tensor | None, heads: int, kept: list[tuple[int, ...]], qk: int, d: int
               ) -> torch.Tensor | None:
    """Rows ``[heads * qk, ...]`` in rotate-half layout -> ``[heads * d, ...]`` with head ``h``'s
    pair ``p`` (frequency ``kept[h][p]``) at rows ``2j, 2j+1``. A frequency repeats only on the
    zero pairs padding appends (spec rule): its first occurrence is the one placed."""
    if t is None:
        return None
    m = qk // 2
    src = t.reshape(heads, qk, *t.shape[1:])
    out = src.new_zeros(heads, d, *t.shape[1:])
    for h in range(heads):
        seen: set[int] = set()
        for p, j in enumerate(kept[h]):
            if j in seen:
                continue
            seen.add(j)
            out[h, 2 * j] = src[h, p]
            out[h, 2 * j + 1] = src[h, m + p]
    return out.reshape(heads * d, *t.shape[1:])


def layer_tensors(canon: dict, layer: LayerSpec, d: int, n_ff: int
                  ) -> dict[str, torch.Tensor | None]:
    """``{q, q_bias, k, ..., down_bias}`` of one layer in llama.cpp's shapes (float32)."""
    h, hk = layer.num_attention_heads, layer.num_key_value_heads
    q_kept = [layer.rope_kept[i // (h // hk)] for i in range(h)]
    fold = layer.softmax_scale * d ** 0.5
    c = {key: tuple(None if t is None else t.detach().float() for t in pair)
         for key, pair in canon.items()}
    out: dict[str, torch.Tensor | None] = {}
    for key, heads, kept in (("q", h, q_kept), ("k", hk, list(layer.rope_kept))):
        w, b = c[key]
        if key == "q" and fold != 1.0:
            w, b = w * fold, (None if b is None else b * fold)
        out[key] = rope_slots(w, heads, kept, layer.qk_head_dim, d)
        out[f"{key}_bias"] = rope_slots(b, heads, kept, layer.qk_head_dim, d)
    w, b = c["v"]
    out["v"] = pad_heads(w, hk, layer.v_head_dim, d, 0)
    out["v_bias"] = pad_heads(b, hk, layer.v_head_dim, d, 0)
    w, out["o_bias"] = c["o"]
    out["o"] = pad_heads(w, h, layer.v_head_dim, d, 1)
    for key, dim in (("gate", 0), ("up", 0), ("down", 1)):
        w, b = c[key]
        out[key] = pad_axis(w, n_ff, dim)
        out[f"{key}_bias"] = b if key == "down" or b is None else pad_axis(b, n_ff, 0)
    return out


def rope_factors(rotary, d: int, theta: float) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (base frequency / the model's), None when all are 1."""
    base = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    factors = (base / rotary.inv_freq.detach().double().cpu()).float()
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None
    return factors.numpy()


# our canonical keys -> gguf MODEL_TENSOR member names
_NAMES = {"q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT", "gate": "FFN_GATE",
          "up": "FFN_UP", "down": "FFN_DOWN"}


def gguf_tensors(model, family: Family, spec: ModelSpec, plan: GGUFPlan, theta: float
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, float32 array [out, in])`` for every tensor of the GGUF, in llama.cpp's order."""
    import gguf

    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR
    parts = family.parts(model)

    def arr(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(torch.float32).cpu().contiguous().numpy()

    yield names[t.TOKEN_EMBD] + ".weight", arr(parts.embed.weight)
    factors = rope_factors(parts.rotary, plan.head_dim, theta)
    if factors is not None:
        yield names[t.ROPE_FREQS] + ".weight", factors
    for i, (module, layer, lp) in enumerate(zip(family.decoder_layers(model), spec.layers,
                                                plan.layers)):
        tensors = layer_tensors(family.canonical(module), layer, plan.head_dim, lp.n_ff)
        attn_norm, ffn_norm = family.norms(module)
        yield names[t.ATTN_NORM].format(bid=i) + ".weight", arr(attn_norm.weight)
        for key, member in _NAMES.items():
            name = names[getattr(t, member)].format(bid=i)
            yield name + ".weight", arr(tensors[key])
            if tensors[f"{key}_bias"] is not None:
                yield name + ".bias", arr(tensors[f"{key}_bias"])
        yield names[t.FFN_NORM].format(bid=i) + ".weight", arr(ffn_norm.weight)
    yield names[t.OUTPUT_NORM] + ".weight", arr(parts.final_norm.weight)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != parts.embed.weight.data_ptr():
        yield names[t.OUTPUT] + ".weight", arr(head.weight)
