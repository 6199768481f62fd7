"""ecospa-deploy: structurally pruned transformer LLMs as first-class deployable models.

``import ecospa_deploy`` registers our model types with transformers' Auto classes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ecospa_deploy.errors import CheckpointError, EcospaError, SpecError, UnsupportedError
from ecospa_deploy.modeling import (EcospaGPT2Config, EcospaGPT2LMHeadModel, EcospaLlamaConfig,
                                    EcospaLlamaForCausalLM, from_hf)
from ecospa_deploy.spec import DenseShape, LayerSpec, ModelSpec


def __getattr__(name: str):
    # Loader entry points import lazily (they pull safetensors/tokenizers machinery).
    if name in ("load_model", "load_tokenizer"):
        from ecospa_deploy import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'ecospa_deploy' has no attribute {name!r}")


__all__ = ["__version__", "load_model", "load_tokenizer", "from_hf", "LayerSpec", "ModelSpec",
           "DenseShape", "EcospaLlamaConfig", "EcospaLlamaForCausalLM", "EcospaGPT2Config",
           "EcospaGPT2LMHeadModel", "EcospaError", "CheckpointError", "SpecError",
           "UnsupportedError"]
