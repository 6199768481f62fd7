"""vLLM plugin (entry point ``vllm.general_plugins: ecospa``): our model types become vLLM models.

vLLM calls ``register()`` in every process it starts. It registers our configs with
``AutoConfig`` (so vLLM parses ``config.json`` of ``model_type`` ``ecospa_llama``/``ecospa_gpt2``
without remote code) and our architectures with vLLM's ``ModelRegistry`` as lazy
``"module:Class"`` strings, so nothing heavy (or CUDA) is imported until a model is built.
Serve a directory written by ``ecospa convert vllm``.
"""

from __future__ import annotations

from ecospa_deploy.families import families

# config.json "architectures" name -> vLLM implementation, imported lazily by vLLM.
ARCHITECTURES: dict[str, str] = {f.architecture: f.vllm_model for f in families().values()}


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    for fam in families().values():
        AutoConfig.register(fam.model_type, fam.load("config_class"), exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = ["register", "ARCHITECTURES"]
