"""HF configs of our model types: a dense family config plus an ``ecospa`` block (one spec per layer).

Global keys (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``) hold the per-layer *maxima*, so tools that size buffers from globals stay
safe; every module is built from ``config.ecospa_spec.layers[i]``, never from a global.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, LlamaConfig

from ..spec import DenseShape, LayerSpec, ModelSpec, SpecError


def _layer_types(spec: ModelSpec) -> tuple[list[str], int | None]:
    windows = {layer.sliding_window for layer in spec.layers} - {None}
    if len(windows) > 1:
        raise SpecError(f"layers use several sliding windows {sorted(windows)}; expected one")
    types = ["sliding_attention" if layer.sliding_window else "full_attention"
             for layer in spec.layers]
    return types, (windows.pop() if windows else None)


class _EcospaConfigMixin:
    """Parses, validates and caches the ``ecospa`` block."""

    # (block, layer count, parsed spec): in a slot, outside __dict__, so it is never serialized
    # or compared; a new block object or layer count misses it.
    __slots__ = ("_spec_cache",)
    ecospa: dict[str, Any] | None

    @property
    def ecospa_spec(self) -> ModelSpec:
        """The validated per-layer spec, parsed once per ``ecospa`` block (assigning the block
        or the layer count parses again; edit it with ``set_spec``, not in place)."""
        if not self.ecospa:
            raise SpecError(f"{type(self).__name__} has no 'ecospa' block; expected one spec "
                            "per layer (build it with from_spec or load_model)")
        cached = getattr(self, "_spec_cache", None)
        if cached is None or cached[0] is not self.ecospa or cached[1] != self.num_hidden_layers:
            spec = ModelSpec.from_dict(self.ecospa).validate(self.num_hidden_layers)
            self._spec_cache = (self.ecospa, self.num_hidden_layers, spec)
        return self._spec_cache[2]

    def set_spec(self, spec: ModelSpec) -> None:
        """Replace the per-layer spec and refresh the global maxima."""
        spec.validate(self.num_hidden_layers)
        self.ecospa = spec.to_dict()
        self._spec_cache = (self.ecospa, self.num_hidden_layers, spec)
        self._apply_maxima(spec)

    def _apply_maxima(self, spec: ModelSpec) -> None:
        raise NotImplementedError


@strict
class EcospaLlamaConfig(_EcospaConfigMixin, LlamaConfig):
    """Llama-family decoder (Llama 2/3, Mistral, Qwen2) whose layers each have their own shape."""

    model_type = "ecospa_llama"
    base_model_tp_plan = None  # per-layer widths: TP goes through the vLLM converter
    ecospa: dict[str, Any] | None = None

    def validate_architecture(self) -> None:
        # hidden_size need not be a multiple of the global head count: layers carry their own.
        if self.ecospa:
            self.ecospa_spec  # noqa: B018  (validates)

    def _apply_maxima(self, spec: ModelSpec) -> None:
        for key, value in spec.maxima().items():
            setattr(self, key, value)
        self.layer_types, self.sliding_window = _layer_types(spec)

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs: Any) -> "EcospaLlamaConfig":
        kwargs.setdefault("num_hidden_layers", spec.num_layers)
        kwargs["hidden_size"] = spec.hidden_size
        kwargs.update(spec.maxima())
        kwargs["layer_types"], kwargs["sliding_window"] = _layer_types(spec)
        kwargs.pop("use_sliding_window", None)
        kwargs.pop("max_window_layers", None)
        config = cls(ecospa=spec.to_dict(), **kwargs)
        config.ecospa_spec  # noqa: B018  (validates against num_hidden_layers)
        return config

    @property
    def rope_config(self) -> LlamaConfig:
        """A dense LlamaConfig whose head_dim is the rotary dim: what HF's rotary module reads."""
        spec = self.ecospa_spec
        return LlamaConfig(hidden_size=self.hidden_size,
                           num_attention_heads=spec.dense.num_attention_heads,
                           head_dim=spec.dense.head_dim,
                           max_position_embeddings=self.max_position_embeddings,
                           rope_parameters=dict(self.rope_parameters))


@strict
class EcospaGPT2Config(_EcospaConfigMixin, GPT2Config):
    """GPT-2 (Conv1D, fused c_attn, learned positions) whose layers each have their own shape."""

    model_type = "ecospa_gpt2"
    ecospa: dict[str, Any] | None = None

    def validate_architecture(self) -> None:
        if self.ecospa:
            self.ecospa_spec  # noqa: B018

    def _apply_maxima(self, spec: ModelSpec) -> None:
        m = spec.maxima()
        self.n_head = m["num_attention_heads"]
        self.n_inner = m["intermediate_size"]

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs: Any) -> "EcospaGPT2Config":
        kwargs.setdefault("n_layer", spec.num_layers)
        kwargs["n_embd"] = spec.hidden_size
        m = spec.maxima()
        kwargs["n_head"] = m["num_attention_heads"]
        kwargs["n_inner"] = m["intermediate_size"]
        config = cls(ecospa=spec.to_dict(), **kwargs)
        config.ecospa_spec  # noqa: B018
        return config


__all__ = ["EcospaLlamaConfig", "EcospaGPT2Config", "LayerSpec"]
