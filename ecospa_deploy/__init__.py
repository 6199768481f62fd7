"""ecospa-deploy: structurally pruned transformer LLMs as first-class deployable models.

Importing the package is cheap (no torch, no transformers), so the CLI answers ``--help`` and
argument errors at once. The public names below are imported on first use; using a model
class, ``load_model`` or ``from_hf`` (or ``import ecospa_deploy.modeling``) registers our model
types with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ecospa_deploy.version import VERSION as __version__

from ecospa_deploy.errors import (CheckpointError, EcospaError, SpecError, UnsupportedError,
                                  UsageError)
from ecospa_deploy.spec import DenseShape, LayerSpec, ModelSpec

# public name -> module that defines it (imported on first access, PEP 562)
_LAZY: dict[str, str] = {
    "load_model": "ecospa_deploy.loading",
    "load_tokenizer": "ecospa_deploy.loading",
    "from_hf": "ecospa_deploy.modeling",
    "EcospaGPT2Config": "ecospa_deploy.modeling",
    "EcospaGPT2LMHeadModel": "ecospa_deploy.modeling",
    "EcospaLlamaConfig": "ecospa_deploy.modeling",
    "EcospaLlamaForCausalLM": "ecospa_deploy.modeling",
}

if TYPE_CHECKING:
    from ecospa_deploy.loading import load_model, load_tokenizer
    from ecospa_deploy.modeling import (EcospaGPT2Config, EcospaGPT2LMHeadModel,
                                        EcospaLlamaConfig, EcospaLlamaForCausalLM, from_hf)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ecospa_deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "load_model", "load_tokenizer", "from_hf", "LayerSpec", "ModelSpec",
           "DenseShape", "EcospaLlamaConfig", "EcospaLlamaForCausalLM", "EcospaGPT2Config",
           "EcospaGPT2LMHeadModel", "EcospaError", "CheckpointError", "SpecError",
           "UnsupportedError", "UsageError"]
