"""What llama.cpp can hold of a pruned model, and what fitting it in costs (shapes only, no torch).

llama.cpp's ``deci`` architecture (DeciLM / Llama-Nemotron-NAS) reads the head counts and the FFN
width *per layer* (``n_head(il)``, ``n_head_kv(il)``, ``n_ff(il)``), which is what a pruned model
needs; its head dims are global and its graph asserts key length == value length == rotary dim.
So every layer's q/k heads go back to the dense rotary dim, each kept rotary pair at the slot of
its own frequency (zeros elsewhere), and every v head is zero-padded to the same dim: exact
(zeros add nothing to q·k, and zero v dims meet zero o_proj columns), at the cost of the q/k/v/o
bytes that pruning head dims had saved; ``PaddingCost`` says how many.

Refused, in one line, before anything is written: what the deci graph does not compute (no RoPE,
LayerNorm, an ungated or non-SiLU MLP, Qwen3's q/k norms, sliding windows, partial RoPE, RoPE
scalings other than a per-frequency factor, attention scaling) and v heads wider than the
rotary dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.padding import round_up
from ecospa_deploy.spec import ModelSpec

ARCH = "deci"
# outtype -> (tensor type of matrices, file type), written by the gguf package
GGUF_PY_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
            "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
            "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
            "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
# outtype -> llama.cpp's LLAMA_FTYPE_* (quantized by llama.cpp from an f32 file)
LLAMA_CPP_TYPES = {"q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M",
              "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
OUTTYPES = tuple(GGUF_PY_TYPES) + tuple(LLAMA_CPP_TYPES)


# HF rope types whose effect is a fixed factor per frequency (llama.cpp's rope_freqs tensor)
FACTOR_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class LayerPlan:
    n_head: int
    n_head_kv: int
    n_ff: int                # after --ffn-multiple
    n_ff_kept: int           # the checkpoint's own width


@dataclass(frozen=True)
class PaddingCost:
    """Weights (elements) of the attention projections, as pruned and as llama.cpp stores them,
    and of the FFN before/after alignment."""

    attn_pruned: int
    attn_padded: int
    ffn_pruned: int
    ffn_padded: int

    @property
    def extra(self) -> int:
        return self.attn_padded - self.attn_pruned + self.ffn_padded - self.ffn_pruned


@dataclass(frozen=True)
class GGUFPlan:
    head_dim: int            # key_length = value_length = rope dimension count
    layers: tuple[LayerPlan, ...]
    cost: PaddingCost


def unsupported(spec: ModelSpec, config: Any, activation: str, rotary: Any) -> str | None:
    """Why llama.cpp cannot run this model exactly (None when it can)."""
    if not spec.rope:
        return "learned position embeddings (llama.cpp's per-layer architecture needs RoPE)"
    if spec.norm != "rmsnorm":
        return f"{spec.norm} (llama.cpp's per-layer architecture has RMSNorm only)"
    if not spec.gated_mlp or activation != "silu":
        return (f"the MLP is {'gated' if spec.gated_mlp else 'ungated'} {activation}; llama.cpp's "
                "per-layer architecture computes a SiLU-gated MLP only")
    if spec.qk_norm:
        return ("q/k norms (Qwen3): llama.cpp's per-layer architecture (deci) has none, and its "
                "qwen3 architecture has one shape for every layer")
    windows = sorted({layer.sliding_window for layer in spec.layers} - {None})
    if windows:
        return (f"sliding-window attention (window {windows[0]}): llama.cpp's per-layer "
                "architecture attends to the whole context, which changes every logit past the "
                "window")
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return f"partial RoPE (partial_rotary_factor={rope['partial_rotary_factor']})"
    kind = getattr(rotary, "rope_type", "default")
    if kind not in FACTOR_ROPE_TYPES:
        return (f"rope_type={kind!r}; llama.cpp's per-layer architecture reproduces only "
                f"{list(FACTOR_ROPE_TYPES)} (a fixed factor per frequency)")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return f"RoPE attention scaling {rotary.attention_scaling} (llama.cpp would ignore it)"
    wide = [i for i, layer in enumerate(spec.layers) if layer.v_head_dim > spec.dense.head_dim]
    if wide:
        return (f"layer {wide[0]}: v_head_dim={spec.layers[wide[0]].v_head_dim} exceeds the "
                f"rotary dim {spec.dense.head_dim} (llama.cpp's value length must equal it)")
    return None


def plan(spec: ModelSpec, config: Any, activation: str, rotary: Any,
         ffn_multiple: int | None = None) -> GGUFPlan:
    """The GGUF shapes of ``spec``; ``UnsupportedError`` (one line) when llama.cpp cannot hold it.

    ``ffn_multiple``: zero-pad every FFN width to a multiple of this (256 lets k-quants quantize
    ``ffn_down``, whose rows are FFN-wide; 32 the legacy quants)."""
    reason = unsupported(spec, config, activation, rotary)
    if reason:
        raise UnsupportedError(f"cannot write a GGUF that llama.cpp runs exactly: {reason}")
    if ffn_multiple is not None and ffn_multiple < 1:
        raise ValueError(f"ffn_multiple={ffn_multiple!r}; expected an int >= 1")
    d, h = spec.dense.head_dim, spec.hidden_size
    layers, attn_pruned, attn_padded, ffn_pruned, ffn_padded = [], 0, 0, 0, 0
    n_mats = 3 if spec.gated_mlp else 2
    for layer in spec.layers:
        # an FFN-free layer keeps one zero channel: deci's graph skips a layer's residual
        # add together with an absent FFN (n_ff = 0), which would drop its attention too
        n_ff = round_up(max(layer.intermediate_size, 1), ffn_multiple)
        layers.append(LayerPlan(layer.num_attention_heads, layer.num_key_value_heads, n_ff,
                                layer.intermediate_size))
        attn_pruned += h * (layer.q_width + layer.k_width + layer.v_width + layer.o_width)
        attn_padded += h * d * 2 * (layer.num_attention_heads + layer.num_key_value_heads)
        ffn_pruned += n_mats * h * layer.intermediate_size
        ffn_padded += n_mats * h * n_ff
    return GGUFPlan(d, tuple(layers),
                    PaddingCost(attn_pruned, attn_padded, ffn_pruned, ffn_padded))
