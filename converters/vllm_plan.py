"""What vLLM needs from a per-layer-shaped model, and what padding it to that costs.

vLLM's attention backends run one head size for q, k and v (64, 128 and 256 are accepted by
every backend; DESIGN.md §6), and tensor parallelism splits every layer's query heads, KV heads
and FFN neurons evenly across ranks. ``plan_vllm`` turns a ``ModelSpec`` into the padded spec
that satisfies both — q/k and v head dims padded with zeros to one head size, KV groups and FFN
neurons padded with zeros to multiples of the TP size — or refuses with the reason. It works
on shapes only, so the overhead of a paper's shape is known without any weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.spec import LayerSpec, ModelSpec

HEAD_SIZES = (64, 128, 256)
LLAMA_ACTIVATIONS = ("silu",)
GPT2_ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _layer_params(spec: ModelSpec, layer: LayerSpec) -> int:
    return layer.num_params(spec.hidden_size, spec.gated_mlp, norm_bias=not spec.rope)


@dataclass
class VLLMPlan:
    """The padded spec plus what it costs (bytes counted at equal element size)."""

    source: ModelSpec
    padded: ModelSpec
    tensor_parallel_size: int
    head_size: int
    layer_params_before: int
    layer_params_after: int
    kv_elements_per_token_before: int
    kv_elements_per_token_after: int
    notes: list[str] = field(default_factory=list)

    @property
    def weight_overhead_pct(self) -> float:
        """Extra decoder-layer weight bytes, % of the unpadded layers."""
        return 100.0 * (self.layer_params_after / self.layer_params_before - 1.0)

    @property
    def kv_overhead_pct(self) -> float:
        """Extra KV-cache bytes per token, % of the unpadded cache."""
        return 100.0 * (self.kv_elements_per_token_after / self.kv_elements_per_token_before - 1)

    def overhead_pct(self, embedding_params: int) -> float:
        """Extra bytes of the whole model (embeddings/head are never padded), %."""
        before = self.layer_params_before + embedding_params
        return 100.0 * (self.layer_params_after - self.layer_params_before) / before

    def as_dict(self, embedding_params: int = 0) -> dict[str, Any]:
        return {
            "tensor_parallel_size": self.tensor_parallel_size,
            "head_size": self.head_size,
            "layer_params_before": self.layer_params_before,
            "layer_params_after": self.layer_params_after,
            "layer_weight_overhead_pct": round(self.weight_overhead_pct, 3),
            "model_weight_overhead_pct": round(self.overhead_pct(embedding_params), 3),
            "kv_elements_per_token_before": self.kv_elements_per_token_before,
            "kv_elements_per_token_after": self.kv_elements_per_token_after,
            "kv_cache_overhead_pct": round(self.kv_overhead_pct, 3),
            "notes": self.notes,
            "layers": [{"num_attention_heads": l.num_attention_heads,
                        "num_key_value_heads": l.num_key_value_heads,
                        "head_size": l.qk_head_dim, "intermediate_size": l.intermediate_size}
                       for l in self.padded.layers],
        }


def choose_head_size(spec: ModelSpec, head_size: int | None) -> int:
    """``head_size`` checked against every layer, or the smallest supported size that fits."""
    widest = max(max(layer.qk_head_dim, layer.v_head_dim) for layer in spec.layers)
    fits = [s for s in HEAD_SIZES if s >= widest]
    if head_size is None:
        if not fits:
            raise UnsupportedError(f"the widest head dim is {widest}; vLLM's backends accept "
                                   f"head sizes {list(HEAD_SIZES)}, none of which fits")
        head_size = fits[0]
    if head_size not in HEAD_SIZES:
        raise UnsupportedError(f"head_size={head_size} is not supported; expected one of "
                               f"{list(HEAD_SIZES)}")
    for i, layer in enumerate(spec.layers):
        for name in ("qk_head_dim", "v_head_dim"):
            dim = getattr(layer, name)
            if dim > head_size:
                raise UnsupportedError(
                    f"layer {i}: {name}={dim} does not fit head_size={head_size}; the model is "
                    f"too large for it (head sizes that fit: {fits or 'none'})")
    if spec.rope and head_size > spec.dense.head_dim:
        raise UnsupportedError(
            f"head_size={head_size} exceeds the rotary dim {spec.dense.head_dim} of this RoPE "
            f"model: padded q/k dims need distinct unused frequencies, of which there are only "
            f"{spec.dense.head_dim // 2} per head; use a head size <= {spec.dense.head_dim} "
            f"(supported: {[s for s in HEAD_SIZES if s <= spec.dense.head_dim] or 'none'})")
    return head_size


def plan_vllm(spec: ModelSpec, tensor_parallel_size: int = 1, head_size: int | None = None,
              activation: str | None = None) -> VLLMPlan:
    """The padded spec vLLM runs at this TP size and head size, or ``UnsupportedError``."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise UnsupportedError(f"tensor_parallel_size={tp!r}; expected an integer >= 1")
    allowed = LLAMA_ACTIVATIONS if spec.gated_mlp else GPT2_ACTIVATIONS
    if activation is not None and activation not in allowed:
        raise UnsupportedError(f"activation {activation!r} has no vLLM kernel in this plugin; "
                               f"expected one of {list(allowed)}")
    size = choose_head_size(spec, head_size)
    notes: list[str] = []
    layers = []
    for i, layer in enumerate(spec.layers):
        if layer.intermediate_size == 0:
            raise UnsupportedError(f"layer {i}: intermediate_size=0 (FFN fully pruned); vLLM's "
                                   "parallel linear layers need at least one neuron per rank")
        group = layer.num_attention_heads // layer.num_key_value_heads
        n_kv = _round_up(layer.num_key_value_heads, tp)
        ffn = _round_up(layer.intermediate_size, tp)
        if n_kv != layer.num_key_value_heads:
            notes.append(f"layer {i}: KV heads {layer.num_key_value_heads} -> {n_kv} "
                         f"(+{n_kv - layer.num_key_value_heads} zero groups of {group} heads) "
                         f"for tensor_parallel_size={tp}")
        if ffn != layer.intermediate_size:
            notes.append(f"layer {i}: FFN {layer.intermediate_size} -> {ffn} zero-padded for "
                         f"tensor_parallel_size={tp}")
        layers.append(layer.replace(qk_head_dim=size, v_head_dim=size, num_key_value_heads=n_kv,
                                    num_attention_heads=n_kv * group, intermediate_size=ffn,
                                    rope_kept=None))
    # rope_kept of the padded spec is filled in by pad_model; shapes are what this plan fixes.
    padded = ModelSpec(spec.hidden_size, tuple(layers), spec.dense, rope=False,
                       gated_mlp=spec.gated_mlp, provenance=dict(spec.provenance))
    before = sum(_layer_params(spec, l) for l in spec.layers)
    after = sum(_layer_params(spec, l) for l in layers)
    return VLLMPlan(spec, padded, tp, size, before, after,
                    sum(l.kv_cache_width for l in spec.layers),
                    sum(l.kv_cache_width for l in layers), notes)


def shape_of(layer: LayerSpec) -> tuple[int, int, int, int, int]:
    return (layer.num_attention_heads, layer.num_key_value_heads, layer.qk_head_dim,
            layer.v_head_dim, layer.intermediate_size)


__all__ = ["HEAD_SIZES", "VLLMPlan", "plan_vllm", "choose_head_size", "shape_of"]
