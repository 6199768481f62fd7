"""vLLM plugin (entry point ``vllm.general_plugins: ecospa``): our model types become vLLM models.

vLLM calls ``register()`` in every process it starts. It registers our configs with
``AutoConfig`` (so vLLM parses ``config.json`` of ``model_type`` ``ecospa_llama``/``ecospa_gpt2``
without remote code) and our architectures with vLLM's ``ModelRegistry`` as lazy
``"module:Class"`` strings, so nothing heavy (or CUDA) is imported until a model is built.
Serve a directory written by ``ecospa convert vllm``.
"""

from __future__ import annotations

# config.json "architectures" name -> vLLM implementation, imported lazily by vLLM.
ARCHITECTURES: dict[str, str] = {
    "EcospaLlamaForCausalLM": "ecospa_deploy.converters.vllm_llama:EcospaLlamaForVLLM",
    "EcospaGPT2LMHeadModel": "ecospa_deploy.converters.vllm_gpt2:EcospaGPT2ForVLLM",
}


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ecospa_deploy.modeling.configuration_ecospa import EcospaGPT2Config, EcospaLlamaConfig

    AutoConfig.register(EcospaLlamaConfig.model_type, EcospaLlamaConfig, exist_ok=True)
    AutoConfig.register(EcospaGPT2Config.model_type, EcospaGPT2Config, exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


__all__ = ["register", "ARCHITECTURES"]
