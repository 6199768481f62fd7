"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) whose layers each have their own shape.

Weight names equal HF ``LlamaForCausalLM``'s. Layer ``i`` is built from
``config.ecospa_spec.layers[i]``: its own query/KV head counts, q/k head dim, v head dim, kept
rotary frequencies per KV head, softmax scale and FFN width. Rotary cos/sin are computed once at
the dense head dim (HF's rotary module, so llama3/yarn scaling apply unchanged) and each layer
gathers the frequencies its heads kept. With ``spec.qk_norm`` (Qwen3) q and k pass a per-head
RMSNorm before RoPE whose divisor is the dense head dim (``HeadRMSNorm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from ..spec import LayerSpec, qk_norm_heads
from .attention import RopeGather, apply_rope, eager_attention, pad_for_flash, rope_table, \
    sdpa_backends
from .kv_cache import CACHE_KWARG, cache_kwargs, one_cache, start_decode
from .lm_head import causal_lm_output
from .configuration_ecospa import EcospaLlamaConfig
from .remote_code import RemoteCodeSaveMixin


class EcospaRotaryEmbedding(LlamaRotaryEmbedding):
    """HF's rotary module at the dense head dim (the name keeps HF's buffer re-initialisation)."""

    def __init__(self, config: EcospaLlamaConfig):
        super().__init__(config.rope_config)


class HeadRMSNorm(nn.Module):
    """Qwen3's per-head RMSNorm of q or k, exact under q/k-dim pruning and zero padding.

    In the masked dense model a pruned dim is zero before the norm, so a head's RMS is
    ``sqrt(sum over kept dims of x^2 / d_dense + eps)``: the sum of squares is divided by
    ``divisor`` (the dense head dim), never by the layer's own or a padded dim; zero-padded dims
    then change nothing. ``weight`` holds ``rows`` rows of ``head_dim`` (``qk_norm_heads``: one
    shared row, or one per KV head); ``groups`` heads share a row (a KV group's query heads).
    """

    def __init__(self, rows: int, head_dim: int, divisor: int, eps: float, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows * head_dim))
        self.rows, self.head_dim, self.groups = rows, head_dim, groups
        self.divisor, self.variance_epsilon = divisor, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, heads, T, head_dim]``."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.divisor + self.variance_epsilon)
        w = self.weight
        if self.rows > 1:
            w = w.view(self.rows, 1, self.head_dim)
            if self.groups > 1:
                w = w.repeat_interleave(self.groups, dim=0)
        return w * h.to(dtype)

    def extra_repr(self) -> str:
        return (f"rows={self.rows}, head_dim={self.head_dim}, divisor={self.divisor}, "
                f"eps={self.variance_epsilon}")


class EcospaLlamaAttention(nn.Module):
    def __init__(self, config: EcospaLlamaConfig, layer: LayerSpec, layer_idx: int,
                 rope_head_dim: int):
        super().__init__()
        self.config = config            # shared: set_attn_implementation reaches every layer
        self.layer_idx = layer_idx
        self.num_heads = layer.num_attention_heads
        self.num_key_value_heads = layer.num_key_value_heads
        self.num_key_value_groups = layer.num_attention_heads // layer.num_key_value_heads
        self.qk_head_dim = layer.qk_head_dim
        self.v_head_dim = layer.v_head_dim
        self.scaling = layer.softmax_scale
        self.sliding_window = layer.sliding_window
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h = config.hidden_size
        self.q_proj = nn.Linear(h, layer.q_width, bias=layer.qkv_bias)
        self.k_proj = nn.Linear(h, layer.k_width, bias=layer.qkv_bias)
        self.v_proj = nn.Linear(h, layer.v_width, bias=layer.qkv_bias)
        self.o_proj = nn.Linear(layer.o_width, h, bias=layer.o_bias)
        if config.ecospa_spec.qk_norm:
            rows = qk_norm_heads(layer, rope_head_dim)
            norm = dict(divisor=rope_head_dim, eps=config.rms_norm_eps)
            self.q_norm = HeadRMSNorm(rows, layer.qk_head_dim, **norm,
                                      groups=self.num_key_value_groups)
            self.k_norm = HeadRMSNorm(rows, layer.qk_head_dim, **norm)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, seq = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(bsz, seq, self.num_heads, self.qk_head_dim)
        k = self.k_proj(hidden_states).view(bsz, seq, self.num_key_value_heads, self.qk_head_dim)
        v = self.v_proj(hidden_states).view(bsz, seq, self.num_key_value_heads, self.v_head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if hasattr(self, "k_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, *position_embeddings, self.num_key_value_groups)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Looked up per call: set_attn_implementation on the shared config reaches every layer.
        impl = self.config._attn_implementation
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention)
        v_dim = None
        if impl == "sdpa":
            q, k, v, v_dim = pad_for_flash(q, k, v)
        out, weights = attend(self, q, k, v, attention_mask,
                              dropout=self.attention_dropout if self.training else 0.0,
                              scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        if v_dim is not None:
            out = out[..., :v_dim]
        out = out.reshape(bsz, seq, self.num_heads * self.v_head_dim)
        return self.o_proj(out), weights


class EcospaLlamaMLP(nn.Module):
    def __init__(self, config: EcospaLlamaConfig, layer: LayerSpec):
        super().__init__()
        h, n = config.hidden_size, layer.intermediate_size
        self.gate_proj = nn.Linear(h, n, bias=layer.gate_up_bias)
        self.up_proj = nn.Linear(h, n, bias=layer.gate_up_bias)
        self.down_proj = nn.Linear(n, h, bias=layer.down_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EcospaLlamaDecoderLayer(GradientCheckpointingLayer):
    """One layer; ``canonical()`` is its weight-name mapping for surgery and converters."""

    norm_names = ("input_layernorm", "post_attention_layernorm")

    def __init__(self, config: EcospaLlamaConfig, layer: LayerSpec, layer_idx: int,
                 rope_head_dim: int):
        super().__init__()
        self.attention_type = "sliding_attention" if layer.sliding_window else "full_attention"
        self.self_attn = EcospaLlamaAttention(config, layer, layer_idx, rope_head_dim)
        self.mlp = EcospaLlamaMLP(config, layer)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
        """``position_embeddings``: this layer's ``(cos, signed_sin)`` (``RopeGather.layer``)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states),
                                          position_embeddings=position_embeddings,
                                          attention_mask=attention_mask,
                                          cache=cache, **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def canonical(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return canonical_projections(self)

    @torch.no_grad()
    def load_canonical(self, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        for key, proj in _projections(self).items():
            weight, bias = tensors[key]
            proj.weight.copy_(weight)
            if getattr(proj, "bias", None) is not None:
                proj.bias.copy_(bias)


def _projections(layer: nn.Module) -> dict[str, nn.Module]:
    a, m = layer.self_attn, layer.mlp
    out = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
           "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}
    if hasattr(a, "k_norm"):
        out["q_norm"], out["k_norm"] = a.q_norm, a.k_norm
    return out


def canonical_projections(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{q,k,v,o,gate,up,down: (weight [out, in], bias or None)}`` as views, of our layer or a
    stock Llama/Mistral/Qwen2/Qwen3 one (same attribute names); q/k-norm layers add
    ``q_norm``/``k_norm: (weight [rows * qk_head_dim], None)`` (rows: ``qk_norm_heads``)."""
    return {k: (p.weight, getattr(p, "bias", None)) for k, p in _projections(layer).items()}


class EcospaLlamaPreTrainedModel(PreTrainedModel):
    config_class = EcospaLlamaConfig
    config: EcospaLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EcospaLlamaDecoderLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_sdpa = True
    _supports_flash_attn = False    # flash kernels refuse q/k dim != v dim
    _supports_flex_attn = False
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, EcospaLlamaModel):
            init.copy_(module.rope_gather, module.rope.index)


class EcospaLlamaModel(EcospaLlamaPreTrainedModel):
    def __init__(self, config: EcospaLlamaConfig):
        super().__init__(config)
        spec = config.ecospa_spec
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            EcospaLlamaDecoderLayer(config, layer, i, spec.dense.head_dim)
            for i, layer in enumerate(spec.layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EcospaRotaryEmbedding(config)
        self._set_rope(spec)
        self.gradient_checkpointing = False
        self.post_init()

    def _set_rope(self, spec) -> None:
        """The one RoPE gather of ``spec``'s layers; rebuilt when surgery sets a new spec."""
        self._rope_spec = spec
        self.rope = RopeGather(spec.layers, spec.dense.head_dim)
        old = getattr(self, "rope_gather", None)
        # Where the model is being built (the meta device under from_pretrained, whose
        # _init_weights then fills it on the target device), or where the old buffer lives.
        device = old.device if old is not None else torch.empty(0).device
        self.register_buffer("rope_gather", self.rope.index.to(device), persistent=False)

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                use_cache: bool | None = None, past_key_values: Cache | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if self._rope_spec is not self.config.ecospa_spec:
            self._set_rope(self.config.ecospa_spec)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache, position_ids, use_cache = start_decode(
            self.config, inputs_embeds, one_cache(cache, past_key_values), position_ids, use_cache)
        if isinstance(attention_mask, dict):
            masks = attention_mask
        else:
            mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds,
                               attention_mask=attention_mask, position_ids=position_ids,
                               **cache_kwargs(cache))
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        hidden_states = inputs_embeds
        table = rope_table(*self.rotary_emb(hidden_states, position_ids=position_ids))
        gathered = self.rope.gather(table, self.rope_gather)
        with sdpa_backends(hidden_states.device):
            for i, layer in enumerate(self.layers):
                hidden_states = layer(hidden_states, attention_mask=masks[layer.attention_type],
                                      cache=cache,
                                      position_embeddings=self.rope.layer(i, table, gathered),
                                      position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       **cache_kwargs(cache if use_cache else None))


class EcospaLlamaForCausalLM(RemoteCodeSaveMixin, EcospaLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EcospaLlamaConfig):
        super().__init__(config)
        self.model = EcospaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: Cache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=one_cache(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        return causal_lm_output(self, out, labels, logits_to_keep, **kwargs)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def spec_changed(self) -> None:
        """Rebuild what the model derives from the spec's layers (surgery calls this; a forward
        also notices, but a tracer would not see a buffer registered inside it)."""
        self.model._set_rope(self.config.ecospa_spec)

    def build_layer(self, layer: LayerSpec, layer_idx: int) -> EcospaLlamaDecoderLayer:
        """A fresh decoder layer of shape ``layer`` (for surgery)."""
        return EcospaLlamaDecoderLayer(self.config, layer, layer_idx,
                                       self.config.ecospa_spec.dense.head_dim)


__all__ = ["EcospaLlamaForCausalLM", "EcospaLlamaModel", "EcospaLlamaPreTrainedModel"]
