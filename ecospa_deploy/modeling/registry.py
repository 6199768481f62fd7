"""Registry of supported architectures: lazily imported ``module:Class`` strings.

A *family* is one of our model types; several stock HF ``model_type`` values map onto one family
(Mistral and Qwen2 are Llama-shaped decoders). tests/test_registry.py checks that every entry
has a tiny example that builds and runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ecospa_deploy.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    model_type: str           # our config.json model_type
    config: str               # "module:Class"
    model: str                # causal-LM class
    spec_from_config: str     # dense spec of a stock config: "module:function"

    def load(self, what: str) -> Any:
        module, _, name = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), name)


_M = "ecospa_deploy.modeling"
FAMILIES: dict[str, Family] = {
    "llama": Family("ecospa_llama", f"{_M}.configuration_ecospa:EcospaLlamaConfig",
                    f"{_M}.modeling_ecospa_llama:EcospaLlamaForCausalLM",
                    f"{_M}.configuration_ecospa:dense_llama_spec"),
    "gpt2": Family("ecospa_gpt2", f"{_M}.configuration_ecospa:EcospaGPT2Config",
                   f"{_M}.modeling_ecospa_gpt2:EcospaGPT2LMHeadModel",
                   f"{_M}.configuration_ecospa:dense_gpt2_spec"),
}

# Stock HF model_type -> our family.
BASE_MODEL_TYPES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama",
                                    "gpt2": "gpt2"}


def family_of(model_type: str, source: str = "config.json") -> tuple[str, Family]:
    """(family name, Family) for our or a stock ``model_type``; a clear error otherwise."""
    for name, fam in FAMILIES.items():
        if fam.model_type == model_type:
            return name, fam
    if model_type in BASE_MODEL_TYPES:
        name = BASE_MODEL_TYPES[model_type]
        return name, FAMILIES[name]
    allowed = sorted({*BASE_MODEL_TYPES, *(f.model_type for f in FAMILIES.values())})
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; expected one "
                          f"of {allowed}")
