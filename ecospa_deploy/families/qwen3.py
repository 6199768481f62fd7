"""The Qwen3 family: a Llama decoder plus a per-head RMSNorm on q and on k before RoPE
(``self_attn.q_norm``/``k_norm``, one weight of head_dim shared by every head) and no qkv bias.

Everything else is the Llama family's: our model type stays ``ecospa_llama`` (same modeling
file, same vLLM model); the spec's ``qk_norm`` flag switches the norms on. Under q/k-dim pruning
the norm divides by the dense head dim and its weight may become one row per KV head
(``ecospa_deploy.spec.qk_norm_heads``), so the pruned model equals the masked dense one.
"""

from __future__ import annotations

from typing import Any

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families.llama import LlamaFamily
from ecospa_deploy.spec import ModelSpec


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    stock = {"qwen3": "transformers:Qwen3ForCausalLM"}
    qkv_bias_types = ()
    qk_norm = True
    # every feature on: GQA, head_dim apart from hidden/heads, q/k norm (always on in Qwen3)
    tiny = {"qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)}

    def infer_spec(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> ModelSpec:
        spec = super().infer_spec(config, shapes)
        d = spec.dense.head_dim
        for i in range(spec.num_layers):
            for key in ("q_norm", "k_norm"):
                name = f"model.layers.{i}.self_attn.{key}.weight"
                if name not in shapes:
                    raise CheckpointError(f"layer {i}: missing tensor {name!r} (Qwen3 normalises "
                                          "q and k per head)")
                if tuple(shapes[name]) != (d,):
                    raise CheckpointError(f"layer {i}: {name} has shape {list(shapes[name])}; "
                                          f"expected [{d}] (one weight shared by every head)")
        return spec


FAMILY = Qwen3Family()
