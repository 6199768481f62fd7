"""vLLM plugin (entry point ``vllm.general_plugins: ecospa``): our model types become vLLM models.

vLLM calls ``register()`` in every process it starts. It registers our configs with
``AutoConfig`` (so vLLM parses ``config.json`` of ``model_type`` ``ecospa_llama``/``ecospa_gpt2``
without remote code) and our architectures with vLLM's ``ModelRegistry`` as lazy
``"module:Class"`` strings, so nothing heavy (or CUDA) is imported until a model is built.
Serve a directory written by ``ecospa convert vllm``.
"""

from __future__ import annotations

from ecospa_deploy.families import families
from ecospa_deploy.families.base import load

# config.json "architectures" name -> vLLM implementation, imported lazily by vLLM. Families
# that share our model type (Qwen3 is stored as ecospa_llama) share one entry: the first's.
ARCHITECTURES: dict[str, str] = {}
for _fam in families().values():
    ARCHITECTURES.setdefault(_fam.architecture, _fam.vllm_model)


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    for model_type, config in dict.fromkeys((f.model_type, f.config_class)
                                            for f in families().values()):
        AutoConfig.register(model_type, load(config), exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = ["register", "ARCHITECTURES"]
