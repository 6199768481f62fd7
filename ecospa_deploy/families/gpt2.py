"""The GPT-2 family: LayerNorm with bias, learned positions, GELU MLP, Conv1D weights stored
``[in, out]`` and q|k|v fused in one ``c_attn`` (split per layer in our model)."""

from __future__ import annotations

from typing import Any

from ecospa_deploy.families.base import Family, Parts, heads_in, matrix_shape
from ecospa_deploy.spec import DenseShape, ModelSpec, SpecError

_M = "ecospa_deploy.modeling"


class GPT2Family(Family):
    name = "gpt2"
    model_type = "ecospa_gpt2"
    stock = {"gpt2": "transformers:GPT2LMHeadModel"}
    config_class = f"{_M}.configuration_ecospa:EcospaGPT2Config"
    model_class = f"{_M}.modeling_ecospa_gpt2:EcospaGPT2LMHeadModel"
    base_model_class = f"{_M}.modeling_ecospa_gpt2:EcospaGPT2Model"
    canonical_fn = f"{_M}.modeling_ecospa_gpt2:canonical_projections"
    vllm_model = "ecospa_deploy.converters.vllm.gpt2:EcospaGPT2ForVLLM"
    layers_key = "n_layer"
    norm = "layernorm"
    positions = "learned"
    gated_mlp = False
    attention_mask = "4d"
    global_keys = ("n_layer", "n_embd", "n_head", "n_inner")
    tiny = {"gpt2": dict(num_attention_heads=4, pad_token_id=None, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)}    # Conv1D, fused c_attn
    train_shapes = {
        "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512),
        "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      intermediate_size=2048)}
    train_defaults = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                          eos_token_id=0)

    def dense_spec(self, config: Any) -> ModelSpec:
        head_dim = config.n_embd // config.n_head
        inner = config.n_inner or 4 * config.n_embd
        dense = DenseShape(config.n_head, config.n_head, head_dim, inner)
        layers = []
        for i in range(config.n_layer):
            scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            layers.append(dense.layer(softmax_scale=scale, rope=False, qkv_bias=True,
                                      o_bias=True, gate_up_bias=True, down_bias=True))
        return ModelSpec(config.n_embd, tuple(layers), dense, positions=self.positions,
                         norm=self.norm, gated_mlp=self.gated_mlp,
                         provenance={"base_model_type": "gpt2"}).validate()

    def infer_spec(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> ModelSpec:
        dense = self.dense_spec(config)
        d = dense.dense.head_dim
        prefix = "transformer." if any(n.startswith("transformer.") for n in shapes) else ""
        layers = []
        for i, base in enumerate(dense.layers):
            p = f"{prefix}h.{i}."
            c_attn = matrix_shape(shapes, p + "attn.c_attn.weight", i)
            fc = matrix_shape(shapes, p + "mlp.c_fc.weight", i)
            n = heads_in(c_attn[1], 3 * d, "output columns (q|k|v)", i, p + "attn.c_attn.weight")
            if n == 0:
                raise SpecError(f"layer {i}: {p}attn has no heads left; expected at least one")
            layers.append(base.replace(num_attention_heads=n, num_key_value_heads=n,
                                       intermediate_size=fc[1]))
        return dense.replace_layers(layers)

    def stock_config(self, dims: dict[str, Any], model_type: str | None = None) -> Any:
        from transformers import GPT2Config

        d = dict(dims)
        renames = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                   "num_attention_heads": "n_head", "intermediate_size": "n_inner",
                   "max_position_embeddings": "n_positions"}
        for ours, theirs in renames.items():
            if ours in d:
                d.setdefault(theirs, d.pop(ours))    # a GPT-2 key given as such wins
        for unused in ("num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                       "tie_word_embeddings"):
            d.pop(unused, None)
        return GPT2Config(**d)

    def norm_eps(self, config: Any) -> float:
        return config.layer_norm_epsilon

    def activation(self, config: Any) -> str:
        return config.activation_function

    def max_positions(self, config: Any) -> int | None:
        return config.n_positions

    def decoder_layers(self, model: Any) -> Any:
        return getattr(model, "transformer", model).h

    def norms(self, layer: Any) -> tuple[Any, Any]:
        return layer.ln_1, layer.ln_2

    def parts(self, model: Any) -> Parts:
        base = model.transformer
        return Parts(embed=base.wte, positions=base.wpe, final_norm=base.ln_f, rotary=None)

    def stat_modules(self, layer: Any) -> dict[str, Any]:
        return {"attn": layer.attn.c_attn, "o": layer.attn.c_proj, "down": layer.mlp.c_proj}


FAMILY = GPT2Family()
