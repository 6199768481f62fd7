"""GPT-2 (Conv1D, fused ``c_attn``, learned positions, GELU) whose layers each have their own shape.

Weight names equal HF ``GPT2LMHeadModel``'s. ``c_attn`` of layer ``i`` is ``[hidden, H*qk + H*qk +
H*v]`` (q | k | v, Conv1D ``[in, out]`` layout) with ``H``, ``qk``, ``v`` from
``config.ecospa_spec.layers[i]``; the softmax scale is the dense one (it already folds in
``scale_attn_by_inverse_layer_idx``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..spec import LayerSpec
from .attention import aligned, eager_attention, pad_for_flash, sdpa_backends
from .kv_cache import cache_kwargs, one_cache, start_decode
from .lm_head import causal_lm_output
from .configuration_ecospa import EcospaGPT2Config
from .remote_code import RemoteCodeSaveMixin


class EcospaGPT2Attention(nn.Module):
    def __init__(self, config: EcospaGPT2Config, layer: LayerSpec, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = layer.num_attention_heads
        self.num_key_value_groups = 1
        self.qk_head_dim = layer.qk_head_dim
        self.v_head_dim = layer.v_head_dim
        self.scaling = layer.softmax_scale
        self.is_causal = True
        self.split = (layer.q_width, layer.k_width, layer.v_width)
        self.c_attn = Conv1D(sum(self.split), config.n_embd)
        self.c_proj = Conv1D(config.n_embd, layer.o_width)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        bsz, seq = hidden_states.shape[:2]
        q, k, v = self.c_attn(hidden_states).split(self.split, dim=-1)
        q = q.view(bsz, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)
        k = k.view(bsz, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)
        v = v.view(bsz, seq, self.num_heads, self.v_head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Looked up per call: set_attn_implementation on the shared config reaches every layer.
        impl = self.config._attn_implementation
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention)
        v_dim = None
        if impl == "sdpa":
            q, k, v, v_dim = pad_for_flash(aligned(q), aligned(k), aligned(v))
        out, _ = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                        dropout=self.attn_dropout if self.training else 0.0, **kwargs)
        if v_dim is not None:
            out = out[..., :v_dim]
        out = out.reshape(bsz, seq, self.num_heads * self.v_head_dim)
        return self.resid_dropout(self.c_proj(out))


class EcospaGPT2MLP(nn.Module):
    def __init__(self, config: EcospaGPT2Config, layer: LayerSpec):
        super().__init__()
        self.c_fc = Conv1D(layer.intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, layer.intermediate_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class EcospaGPT2Block(GradientCheckpointingLayer):
    """One block; ``canonical()`` is its weight-name mapping for surgery and converters."""

    norm_names = ("ln_1", "ln_2")

    def __init__(self, config: EcospaGPT2Config, layer: LayerSpec, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = EcospaGPT2Attention(config, layer, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = EcospaGPT2MLP(config, layer)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_mask,
                                                  cache, **kwargs)
        return hidden_states + self.mlp(self.ln_2(hidden_states))

    def canonical(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return canonical_projections(self)

    @torch.no_grad()
    def load_canonical(self, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        a, m = self.attn, self.mlp
        a.c_attn.weight.copy_(torch.cat([tensors[k][0] for k in "qkv"], dim=0).t())
        a.c_attn.bias.copy_(torch.cat([tensors[k][1] for k in "qkv"], dim=0))
        for key, conv in (("o", a.c_proj), ("up", m.c_fc), ("down", m.c_proj)):
            conv.weight.copy_(tensors[key][0].t())
            conv.bias.copy_(tensors[key][1])


def canonical_projections(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{q,k,v,o,up,down: (weight [out, in], bias)}`` of our block or a stock GPT-2 one: Conv1D
    weights transposed, c_attn split at the block's q|k|v widths (``attn.split`` in ours, equal
    thirds in a stock block)."""
    a, m = layer.attn, layer.mlp
    n = a.c_attn.weight.shape[1]
    split = getattr(a, "split", None) or (n // 3, n // 3, n // 3)
    qw, kw, vw = a.c_attn.weight.split(split, dim=1)
    qb, kb, vb = a.c_attn.bias.split(split, dim=0)
    return {"q": (qw.t(), qb), "k": (kw.t(), kb), "v": (vw.t(), vb),
            "o": (a.c_proj.weight.t(), a.c_proj.bias),
            "up": (m.c_fc.weight.t(), m.c_fc.bias), "down": (m.c_proj.weight.t(), m.c_proj.bias)}


class EcospaGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = EcospaGPT2Config
    config: EcospaGPT2Config
    _no_split_modules = ["EcospaGPT2Block"]
    _supports_flash_attn = False    # flash kernels refuse q/k dim != v dim
    _supports_flex_attn = False
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {}


class EcospaGPT2Model(EcospaGPT2PreTrainedModel):
    def __init__(self, config: EcospaGPT2Config):
        super().__init__(config)
        spec = config.ecospa_spec
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(EcospaGPT2Block(config, layer, i)
                               for i, layer in enumerate(spec.layers))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                use_cache: bool | None = None, past_key_values: Cache | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        cache, position_ids, use_cache = start_decode(
            self.config, inputs_embeds, one_cache(cache, past_key_values), position_ids, use_cache)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask.view(inputs_embeds.shape[0], -1)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, position_ids=position_ids,
                                  **cache_kwargs(cache))
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        with sdpa_backends(hidden_states.device):
            for block in self.h:
                hidden_states = block(hidden_states, mask, cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states),
                                       **cache_kwargs(cache if use_cache else None))


class EcospaGPT2LMHeadModel(RemoteCodeSaveMixin, EcospaGPT2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: EcospaGPT2Config):
        super().__init__(config)
        self.transformer = EcospaGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None,
                cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: Cache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        kwargs.pop("token_type_ids", None)
        out = self.transformer(input_ids=input_ids, cache=one_cache(cache, past_key_values),
                               attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        return causal_lm_output(self, out, labels, logits_to_keep, **kwargs)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def spec_changed(self) -> None:
        """Nothing outside the layers derives from the spec (learned positions, no RoPE)."""

    def build_layer(self, layer: LayerSpec, layer_idx: int) -> EcospaGPT2Block:
        """A fresh block of shape ``layer`` (for surgery)."""
        return EcospaGPT2Block(self.config, layer, layer_idx)


__all__ = ["EcospaGPT2LMHeadModel", "EcospaGPT2Model", "EcospaGPT2PreTrainedModel"]
