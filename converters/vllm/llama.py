"""vLLM model for ``ecospa_llama`` (Llama/Mistral/Qwen2/Qwen3), each layer built from its own spec.

Built on vLLM's parallel layers (``MergedColumnParallelLinear`` for q|k|v and gate|up,
``RowParallelLinear``, vocab-parallel embedding and head), so tensor parallelism shards every
layer by its own head counts and FFN width; projections keep their pruned widths and attention
pads q/k/v to the layer's head size at run time (``common.PaddedAttention``). Expects a
checkpoint written by ``ecospa convert vllm`` (counts divisible by the TP size, per-layer head
sizes recorded) and says so otherwise. Weight names are our checkpoint's (HF ``LlamaForCausalLM``'s).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import (PPMissingLayer, extract_layer_index,
                                              make_empty_intermediate_tensors_factory,
                                              make_layers)
from vllm.sequence import IntermediateTensors

from ecospa_deploy.spec import LayerSpec, qk_norm_heads

from .common import (CausalLMForVLLM, KeptRotary, Loadable, PaddedAttention,
                          attention_head_sizes, check_spec, qkv_linear, tp_rank_and_size)

# Our checkpoint's projection names -> (fused vLLM parameter, shard id).
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class HeadRMSNormVLLM(nn.Module):
    """Qwen3's q/k norm as our modeling's ``HeadRMSNorm`` computes it (vLLM's Qwen3 applies an
    RMSNorm per head before RoPE; ours divides by the dense head dim, so zero-padded and pruned
    dims change nothing). ``rows`` is ``qk_norm_heads``: one shared row, or one per KV head,
    of which this TP rank loads its own ``kv_heads`` from ``kv_start``."""

    def __init__(self, rows: int, size: int, divisor: int, eps: float, kv_start: int,
                 kv_heads: int):
        super().__init__()
        shared = rows == 1
        self.size, self.divisor, self.eps = size, divisor, eps
        self.start = 0 if shared else kv_start * size
        self.weight = nn.Parameter(torch.ones((1 if shared else kv_heads) * size))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded[self.start:self.start + param.numel()])

    def forward(self, x: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """``x [T, kv_heads * group * size]`` -> the same, each head normalised."""
        h = x.view(x.shape[0], kv_heads, -1, self.size).float()
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.divisor + self.eps)
        return (self.weight.view(-1, 1, self.size) * h.to(x.dtype)).reshape(x.shape)


class EcospaVLLMAttention(nn.Module):
    def __init__(self, config, layer: LayerSpec, head_size: int,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        rank, tp = tp_rank_and_size()
        spec = config.ecospa_spec
        self.qkv_proj = qkv_linear(config.hidden_size, layer, layer.qkv_bias, quant_config,
                                   f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(layer.o_width, config.hidden_size, bias=layer.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.attn = PaddedAttention(layer, head_size, tp, cache_config, quant_config,
                                    f"{prefix}.attn", layer.sliding_window)
        self.sizes = [layer.q_width // tp, layer.k_width // tp, layer.v_width // tp]
        dense_rope = get_rope(spec.dense.head_dim, max_position=config.max_position_embeddings,
                              is_neox_style=True,
                              rope_parameters=getattr(config, "rope_parameters", None))
        self.rotary = KeptRotary(dense_rope, layer, rank * self.attn.num_kv_heads,
                                 self.attn.num_kv_heads)
        self.qk_norm = bool(spec.qk_norm)
        if self.qk_norm:
            # at the layer's own q/k dim: the norm runs before the run-time head padding
            norm = (qk_norm_heads(layer, spec.dense.head_dim), layer.qk_head_dim,
                    spec.dense.head_dim, config.rms_norm_eps, rank * self.attn.num_kv_heads,
                    self.attn.num_kv_heads)
            self.q_norm, self.k_norm = HeadRMSNormVLLM(*norm), HeadRMSNormVLLM(*norm)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(self.sizes, dim=-1)
        if self.qk_norm:
            kv_heads = self.attn.num_kv_heads
            q, k = self.q_norm(q, kv_heads), self.k_norm(k, kv_heads)
        q, k = self.rotary(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class EcospaVLLMMLP(nn.Module):
    def __init__(self, config, layer: LayerSpec, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [layer.intermediate_size] * 2, bias=layer.gate_up_bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(layer.intermediate_size, config.hidden_size,
                                           bias=layer.down_bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class EcospaVLLMDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        index = extract_layer_index(prefix)
        layer = config.ecospa_spec.layers[index]
        quant = vllm_config.quant_config
        self.self_attn = EcospaVLLMAttention(config, layer,
                                             attention_head_sizes(config.ecospa_spec)[index],
                                             vllm_config.cache_config, quant,
                                             f"{prefix}.self_attn")
        self.mlp = EcospaVLLMMLP(config, layer, quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# Annotations are strings here (postponed evaluation), so name the dynamic token axis.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class EcospaVLLMLlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_spec(config.ecospa_spec, vllm_config.parallel_config.tensor_parallel_size)
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: EcospaVLLMDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm = (RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank
                     else PPMissingLayer())
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = (inputs_embeds if inputs_embeds is not None
                             else self.embed_input_ids(input_ids))
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class EcospaLlamaForVLLM(CausalLMForVLLM):
    """Registered as vLLM architecture ``EcospaLlamaForCausalLM``."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    inner_cls, inner_name, embedding_name = EcospaVLLMLlamaModel, "model", "embed_tokens"

    def _expand(self, name: str, tensor: torch.Tensor) -> Iterator[Loadable]:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in STACKED:
                fused, shard = STACKED[part]
                yield ".".join(parts[:i] + [fused] + parts[i + 1:]), tensor, shard
                return
        yield name, tensor, None


__all__ = ["EcospaLlamaForVLLM"]
