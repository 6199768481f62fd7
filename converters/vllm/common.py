"""Pieces both vLLM model classes share: the spec check, the q|k|v projection and attention at
pruned widths, per-head kept rotary, weight loading, and the top-level causal LM around each
family's inner model.

Imported only inside vLLM's process (it imports vLLM).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import MergedColumnParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import PPMissingLayer, is_pp_missing_parameter, maybe_prefix
from vllm.sequence import IntermediateTensors

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.spec import LayerSpec, ModelSpec

from .plan import ACCEPTED_HEAD_SIZES, attention_head_sizes

# (vLLM parameter name, tensor, shard id or None)
Loadable = tuple[str, torch.Tensor, "str | int | None"]


def tp_rank_and_size() -> tuple[int, int]:
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def check_spec(spec: ModelSpec, tp: int) -> None:
    """Refuse a checkpoint that was not converted for vLLM at this TP size and platform, saying
    how to fix it."""
    from vllm.platforms import current_platform

    backend = "cpu" if current_platform.is_cpu() else spec.provenance.get(
        "vllm_attention_backend", "portable")
    accepted = ACCEPTED_HEAD_SIZES.get(backend, ACCEPTED_HEAD_SIZES["portable"])
    fix = (f"convert it with `ecospa convert vllm SRC -o OUT --tensor-parallel-size {tp}"
           f"{' --attention-backend cpu' if backend == 'cpu' else ''}`")
    for i, (layer, size) in enumerate(zip(spec.layers, attention_head_sizes(spec))):
        if size not in accepted or size < max(layer.qk_head_dim, layer.v_head_dim):
            raise UnsupportedError(
                f"layer {i}: head dims {layer.qk_head_dim}/{layer.v_head_dim} with attention "
                f"head size {size}: vLLM's {backend} attention backend needs a head size from "
                f"{list(accepted)} that holds both; {fix}")
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(layer, name)
            if value % tp:
                raise UnsupportedError(f"layer {i}: {name}={value} is not divisible by "
                                       f"tensor_parallel_size={tp}; {fix}")


class KeptRotary(nn.Module):
    """RoPE over each KV head's own kept frequencies (neox/rotate-half layout within a head).

    ``dense_rope`` is vLLM's rotary module at the dense head dim (so llama3/yarn scaling are
    vLLM's own); its ``cos_sin_cache [max_pos, D]`` holds cos of every frequency then sin. Each
    KV head gathers the ``qk_head_dim/2`` frequencies it kept (padding dims carry unused ones and
    are zero anyway); its query heads use the same.
    """

    def __init__(self, dense_rope: nn.Module, layer: LayerSpec, kv_start: int, kv_heads: int):
        super().__init__()
        self.dense_rope = dense_rope
        kept = layer.rope_kept[kv_start:kv_start + kv_heads]
        self.register_buffer("freq_index", torch.tensor(kept, dtype=torch.long),
                             persistent=False)
        self.kv_heads = kv_heads
        self.groups = layer.num_attention_heads // layer.num_key_value_heads
        self.qk_head_dim = layer.qk_head_dim

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = positions.shape[0]
        cache = self.dense_rope.cos_sin_cache
        cos_sin = cache.index_select(0, positions.flatten()).to(q.dtype)
        cos, sin = cos_sin.chunk(2, dim=-1)                    # [T, D/2]
        cos, sin = cos[:, self.freq_index], sin[:, self.freq_index]   # [T, Hkv, S/2]
        k = self._rotate(k.view(tokens, self.kv_heads, self.qk_head_dim), cos, sin)
        q = q.view(tokens, self.kv_heads, self.groups, self.qk_head_dim)
        q = self._rotate(q, cos[:, :, None], sin[:, :, None])
        return q.reshape(tokens, -1), k.reshape(tokens, -1)


class PaddedAttention(nn.Module):
    """vLLM's ``Attention`` at a layer's head size, fed q/k/v at the layer's pruned dims.

    q, k and v are zero-padded per head to ``head_size`` right before attention and the output
    is sliced back to the v dim: zero q/k dims add nothing to q·k and zero v dims only produce
    output columns that are dropped, so this is exact, and the projections keep their pruned
    widths (only the KV cache is stored at ``head_size``).
    """

    def __init__(self, layer: LayerSpec, head_size: int, tp: int,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = layer.num_attention_heads // tp
        self.num_kv_heads = layer.num_key_value_heads // tp
        self.qk_head_dim, self.v_head_dim, self.head_size = (layer.qk_head_dim,
                                                             layer.v_head_dim, head_size)
        self.attn = Attention(self.num_heads, head_size, layer.softmax_scale,
                              num_kv_heads=self.num_kv_heads, cache_config=cache_config,
                              quant_config=quant_config, per_layer_sliding_window=sliding_window,
                              prefix=prefix)

    def _pad(self, x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        if dim == self.head_size:
            return x
        x = x.view(x.shape[0], heads, dim)
        return nn.functional.pad(x, (0, self.head_size - dim)).view(x.shape[0], -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attn(self._pad(q, self.num_heads, self.qk_head_dim),
                        self._pad(k, self.num_kv_heads, self.qk_head_dim),
                        self._pad(v, self.num_kv_heads, self.v_head_dim))
        if self.v_head_dim == self.head_size:
            return out
        out = out.view(out.shape[0], self.num_heads, self.head_size)[..., :self.v_head_dim]
        return out.reshape(out.shape[0], -1)


def qkv_linear(hidden_size: int, layer: LayerSpec, bias: bool,
               quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
    """One column-parallel q|k|v projection at the layer's own widths (shards 0, 1, 2).

    Each part is split evenly across ranks; heads are contiguous and the converter makes every
    head count divisible by the TP size, so each rank gets whole heads and the KV groups of its
    query heads."""
    return MergedColumnParallelLinear(hidden_size, [layer.q_width, layer.k_width, layer.v_width],
                                      bias=bias, quant_config=quant_config, prefix=prefix)


def load_mapped(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                expand: Callable[[str, torch.Tensor], Iterator[Loadable]]) -> set[str]:
    """Load checkpoint tensors through ``expand`` (name/shard mapping); return names loaded.

    Each parameter's own ``weight_loader`` shards it for this TP rank; an unknown name is an
    error, never silently dropped.
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        for target, piece, shard in expand(name, tensor):
            if is_pp_missing_parameter(target, module):
                continue
            if target not in params:
                raise UnsupportedError(f"checkpoint tensor {name!r} maps to {target!r}, which "
                                       f"this model does not have")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, piece)
            else:
                loader(param, piece, shard)
            loaded.add(target)
    return loaded


class CausalLMForVLLM(nn.Module, SupportsPP):
    """Inner model + LM head (tied when the config says so) + logits, and weight loading through
    the family's ``_expand`` (checkpoint name -> vLLM parameters). A family sets ``inner_cls``,
    ``inner_name`` (our checkpoint's prefix: ``model``, ``transformer``) and ``embedding_name``."""

    inner_cls: type[nn.Module]
    inner_name: str
    embedding_name: str

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        inner = self.inner_cls(vllm_config=vllm_config,
                               prefix=maybe_prefix(prefix, self.inner_name))
        setattr(self, self.inner_name, inner)
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(getattr(inner, self.embedding_name))
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = inner.make_empty_intermediate_tensors

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.inner_name)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | IntermediateTensors:
        return self.inner(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def _expand(self, name: str, tensor: torch.Tensor) -> Iterator[Loadable]:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped(self, weights, self._expand)


__all__ = ["check_spec", "CausalLMForVLLM", "KeptRotary",
           "PaddedAttention", "load_mapped", "qkv_linear", "tp_rank_and_size"]
