"""HF model classes whose decoder layers each have their own shape, and their registration.

Importing this module registers every family's model type with ``AutoConfig``/``AutoModel``/
``AutoModelForCausalLM``, so ``from_pretrained`` needs no remote code when the package is
installed.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from ecospa_deploy.families import families, family_of
from ecospa_deploy.spec import ModelSpec

from .configuration_ecospa import EcospaGPT2Config, EcospaLlamaConfig
from .modeling_ecospa_gpt2 import EcospaGPT2LMHeadModel, EcospaGPT2Model
from .modeling_ecospa_llama import EcospaLlamaForCausalLM, EcospaLlamaModel

# Families may share our model type (Qwen3 and Phi-3 are stored as ecospa_llama): register each
# type once, by the first family that names it (the one ``family_of`` returns).
_OWNERS = {f.model_type: f for f in reversed(list(families().values()))}
for _fam in _OWNERS.values():
    _config = _fam.load("config_class")
    AutoConfig.register(_fam.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _fam.load("base_model_class"), exist_ok=True)
    AutoModelForCausalLM.register(_config, _fam.load("model_class"), exist_ok=True)

# Our causal-LM classes, once each.
MODEL_CLASSES: tuple[type, ...] = tuple(dict.fromkeys(f.load("model_class")
                                                      for f in families().values()))

# Keys of a stock config that describe the checkpoint, not the model: never copied into ours.
_DROP_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path",
              "use_sliding_window", "max_window_layers", "layer_types", "auto_map", "dtype",
              "torch_dtype")


def config_from_dense(config: Any, spec: ModelSpec | None = None) -> Any:
    """Our config for a stock HF config (dense spec unless ``spec`` is given)."""
    fam = family_of(config.model_type)
    return fam.our_config(config, spec or fam.dense_spec(config), _DROP_KEYS)


def from_hf(model: PreTrainedModel) -> Any:
    """Our model with the same weights as a stock HF causal LM of a supported family."""
    if is_ecospa_model(model):
        return model
    fam = family_of(model.config.model_type)
    config = config_from_dense(model.config)
    config._attn_implementation = model.config._attn_implementation
    cls = fam.load("model_class")
    param = next(model.parameters())
    ours = cls(config).to(device=param.device, dtype=param.dtype)
    state = fam.to_ours(model.state_dict(), config.ecospa_spec)   # stock names -> ours (exact)
    missing, unexpected = ours.load_state_dict(state, strict=False)
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
    return isinstance(model, MODEL_CLASSES)


__all__ = ["EcospaLlamaConfig", "EcospaGPT2Config", "EcospaLlamaForCausalLM",
           "EcospaGPT2LMHeadModel", "EcospaLlamaModel", "EcospaGPT2Model", "from_hf",
           "config_from_dense", "is_ecospa_model", "MODEL_CLASSES"]
