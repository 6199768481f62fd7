"""The Llama family: Llama 2/3, Mistral and Qwen2 are one decoder (RMSNorm, RoPE, SwiGLU); their
differences are data (which stock class reads them, whether q/k/v carry a bias, sliding windows).
"""

from __future__ import annotations

from typing import Any

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families.base import Family, Parts, heads_in, matrix_shape
from ecospa_deploy.spec import DenseShape, LayerSpec, ModelSpec, SpecError

_M = "ecospa_deploy.modeling"


class LlamaFamily(Family):
    name = "llama"
    model_type = "ecospa_llama"
    stock = {"llama": "transformers:LlamaForCausalLM",
             "mistral": "transformers:MistralForCausalLM",
             "qwen2": "transformers:Qwen2ForCausalLM"}
    config_class = f"{_M}.configuration_ecospa:EcospaLlamaConfig"
    model_class = f"{_M}.modeling_ecospa_llama:EcospaLlamaForCausalLM"
    base_model_class = f"{_M}.modeling_ecospa_llama:EcospaLlamaModel"
    canonical_fn = f"{_M}.modeling_ecospa_llama:canonical_projections"
    vllm_model = "ecospa_deploy.converters.vllm.llama:EcospaLlamaForVLLM"
    layers_key = "num_hidden_layers"
    norm = "rmsnorm"
    positions = "rope"
    gated_mlp = True
    attention_mask = "by_type"
    global_keys = ("num_hidden_layers", "hidden_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window",
                   "attention_bias", "mlp_bias")
    # the shapes the project trains (ecospa_deploy.train), stock-config defaults for them
    train_shapes = {
        "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=384),
        "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, intermediate_size=1536)}
    train_defaults = dict(rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
    # tiny stock configs with every feature of each variant on (ecospa_deploy.testing)
    tiny = {
        "llama": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16,   # GQA
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32}),
        "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),               # qkv bias
        "mistral": dict(num_attention_heads=4, num_key_value_heads=1,             # MQA
                        sliding_window=6)}
    # stock types whose q/k/v projections always carry a bias
    qkv_bias_types = ("qwen2",)
    # whether q and k pass a per-head RMSNorm before RoPE (Qwen3: ModelSpec.qk_norm)
    qk_norm = False

    def dense_spec(self, config: Any) -> ModelSpec:
        base_type = config.model_type if config.model_type in self.stock else "llama"
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        n_kv = config.num_key_value_heads or config.num_attention_heads
        dense = DenseShape(config.num_attention_heads, n_kv, head_dim, config.intermediate_size)
        attention_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        layers = []
        for i in range(config.num_hidden_layers):
            sliding = window if (window and (types is None or types[i] == "sliding_attention")) \
                else None
            layers.append(dense.layer(qkv_bias=attention_bias or base_type in self.qkv_bias_types,
                                      o_bias=attention_bias, gate_up_bias=mlp_bias,
                                      down_bias=mlp_bias, sliding_window=sliding))
        return ModelSpec(config.hidden_size, tuple(layers), dense, positions=self.positions,
                         norm=self.norm, gated_mlp=self.gated_mlp, qk_norm=self.qk_norm,
                         provenance={"base_model_type": base_type}).validate()

    def infer_spec(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> ModelSpec:
        dense = self.dense_spec(config)
        d = dense.dense.head_dim
        layers = []
        for i, base in enumerate(dense.layers):
            p = f"model.layers.{i}."
            q = matrix_shape(shapes, p + "self_attn.q_proj.weight", i)
            k = matrix_shape(shapes, p + "self_attn.k_proj.weight", i)
            v = matrix_shape(shapes, p + "self_attn.v_proj.weight", i)
            o = matrix_shape(shapes, p + "self_attn.o_proj.weight", i)
            up = matrix_shape(shapes, p + "mlp.up_proj.weight", i)
            n_q = heads_in(q[0], d, "rows", i, p + "self_attn.q_proj.weight")
            n_kv = heads_in(k[0], d, "rows", i, p + "self_attn.k_proj.weight")
            if n_kv == 0 or n_q == 0:
                raise SpecError(f"layer {i}: {p}self_attn has no heads left (q_proj {list(q)}, "
                                f"k_proj {list(k)}); expected at least one")
            v_dim = heads_in(v[0], n_kv, "rows", i, p + "self_attn.v_proj.weight") if v[0] else 0
            if o[1] != n_q * v_dim:
                raise CheckpointError(f"layer {i}: {p}self_attn.o_proj.weight has {o[1]} input "
                                      f"columns; expected {n_q} heads x {v_dim} = {n_q * v_dim}")
            layers.append(whole_head_layer(base, shapes, p, n_q, n_kv, v_dim, up[0], d,
                                           qkv="self_attn.q_proj.", gate_up="mlp.up_proj."))
        return dense.replace_layers(layers)

    def stock_config(self, dims: dict[str, Any], model_type: str | None = None) -> Any:
        from transformers import AutoConfig

        d = dict(dims)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        if "rope_theta" in d:
            d.setdefault("rope_parameters", {"rope_type": "default",
                                             "rope_theta": d.pop("rope_theta")})
        return AutoConfig.for_model(model_type or self.primary_stock, **d)

    def norm_eps(self, config: Any) -> float:
        return config.rms_norm_eps

    def activation(self, config: Any) -> str:
        return config.hidden_act

    def max_positions(self, config: Any) -> int | None:
        return config.max_position_embeddings

    def decoder_layers(self, model: Any) -> Any:
        return getattr(model, "model", model).layers

    def norms(self, layer: Any) -> tuple[Any, Any]:
        return layer.input_layernorm, layer.post_attention_layernorm

    def parts(self, model: Any) -> Parts:
        base = model.model
        return Parts(embed=base.embed_tokens, positions=None, final_norm=base.norm,
                     rotary=base.rotary_emb)

    def stat_modules(self, layer: Any) -> dict[str, Any]:
        return {"attn": layer.self_attn.q_proj, "o": layer.self_attn.o_proj,
                "down": layer.mlp.down_proj}


def whole_head_layer(base: LayerSpec, shapes: dict[str, tuple[int, ...]], prefix: str,
                     n_q: int, n_kv: int, v_head_dim: int, ffn: int, head_dim: int, *,
                     qkv: str, gate_up: str) -> LayerSpec:
    """``base`` with a foreign checkpoint's counts: whole heads pruned, so every kept head keeps
    every rotary frequency; biases where the checkpoint has them (``qkv``/``gate_up``: the
    modules whose bias stands for q/k/v's and gate/up's)."""
    def has_bias(module: str) -> bool:
        return prefix + module + "bias" in shapes

    return base.replace(
        num_attention_heads=n_q, num_key_value_heads=n_kv, v_head_dim=v_head_dim,
        intermediate_size=ffn, rope_kept=tuple(tuple(range(head_dim // 2)) for _ in range(n_kv)),
        qkv_bias=has_bias(qkv), o_bias=has_bias("self_attn.o_proj."),
        gate_up_bias=has_bias(gate_up), down_bias=has_bias("mlp.down_proj."))


FAMILY = LlamaFamily()
