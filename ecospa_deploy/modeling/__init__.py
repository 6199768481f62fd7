"""HF model classes whose decoder layers each have their own shape, and their registration.

Importing this module registers our model types with ``AutoConfig``/``AutoModel``/
``AutoModelForCausalLM``, so ``from_pretrained`` needs no remote code when the package is
installed.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from ecospa_deploy.spec import ModelSpec

from .configuration_ecospa import (EcospaGPT2Config, EcospaLlamaConfig, dense_gpt2_spec,
                                   dense_llama_spec)
from .modeling_ecospa_gpt2 import EcospaGPT2LMHeadModel, EcospaGPT2Model
from .modeling_ecospa_llama import EcospaLlamaForCausalLM, EcospaLlamaModel
from .registry import BASE_MODEL_TYPES, FAMILIES, family_of

AutoConfig.register("ecospa_llama", EcospaLlamaConfig, exist_ok=True)
AutoConfig.register("ecospa_gpt2", EcospaGPT2Config, exist_ok=True)
AutoModel.register(EcospaLlamaConfig, EcospaLlamaModel, exist_ok=True)
AutoModel.register(EcospaGPT2Config, EcospaGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(EcospaLlamaConfig, EcospaLlamaForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(EcospaGPT2Config, EcospaGPT2LMHeadModel, exist_ok=True)

EcospaModel = EcospaLlamaForCausalLM | EcospaGPT2LMHeadModel

# Keys of a stock config that describe one global shape and must not leak into ours.
_DROP_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path",
              "use_sliding_window", "max_window_layers", "layer_types", "auto_map", "dtype",
              "torch_dtype")


def config_from_dense(config: Any, spec: ModelSpec | None = None) -> EcospaLlamaConfig | EcospaGPT2Config:
    """Our config for a stock HF config (dense spec unless ``spec`` is given)."""
    family, _ = family_of(config.model_type)
    kwargs = {k: v for k, v in config.to_dict().items() if k not in _DROP_KEYS}
    if family == "gpt2":
        spec = spec or dense_gpt2_spec(config)
        for key in ("n_layer", "n_embd", "n_head", "n_inner"):
            kwargs.pop(key, None)
        return EcospaGPT2Config.from_spec(spec, **kwargs)
    spec = spec or dense_llama_spec(config, config.model_type)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "sliding_window", "attention_bias", "mlp_bias"):
        kwargs.pop(key, None)
    return EcospaLlamaConfig.from_spec(spec, num_hidden_layers=spec.num_layers, **kwargs)


def from_hf(model: PreTrainedModel) -> EcospaLlamaForCausalLM | EcospaGPT2LMHeadModel:
    """Our model with the same weights as a stock HF Llama/Mistral/Qwen2/GPT-2 causal LM."""
    if isinstance(model, (EcospaLlamaForCausalLM, EcospaGPT2LMHeadModel)):
        return model
    config = config_from_dense(model.config)
    config._attn_implementation = model.config._attn_implementation
    cls = EcospaGPT2LMHeadModel if isinstance(config, EcospaGPT2Config) else EcospaLlamaForCausalLM
    param = next(model.parameters())
    ours = cls(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = ours.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in ours.all_tied_weights_keys]
    unexpected = [k for k in unexpected if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"weights of {type(model).__name__} do not map onto {cls.__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    ours.tie_weights()
    if model.generation_config is not None:
        ours.generation_config = model.generation_config
    return ours.eval() if not model.training else ours


def is_ecospa_model(model: Any) -> bool:
    return isinstance(model, (EcospaLlamaForCausalLM, EcospaGPT2LMHeadModel))


__all__ = ["EcospaLlamaConfig", "EcospaGPT2Config", "EcospaLlamaForCausalLM",
           "EcospaGPT2LMHeadModel", "EcospaLlamaModel", "EcospaGPT2Model", "from_hf",
           "config_from_dense", "is_ecospa_model", "FAMILIES", "BASE_MODEL_TYPES", "family_of"]
