"""vLLM model for ``ecospa_gpt2``: GPT-2 blocks each built from their own spec.

The checkpoint's fused ``c_attn`` (Conv1D ``[in, q|k|v]``) is split by the layer's own widths
and loaded into one column-parallel q|k|v projection (``common.qkv_linear``) so tensor
parallelism shards heads, not raw columns;
Conv1D weights are transposed to vLLM's ``[out, in]`` on load. Expects a checkpoint written by
``ecospa convert vllm``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import (extract_layer_index,
                                              make_empty_intermediate_tensors_factory,
                                              make_layers)
from vllm.sequence import IntermediateTensors

from ecospa_deploy.spec import LayerSpec

from .common import (CausalLMForVLLM, Loadable, PaddedAttention, attention_head_sizes,
                          check_spec, qkv_linear, tp_rank_and_size)

# Conv1D weights stored [in, out] in the checkpoint.
CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")   # HF's causal-mask buffers in old checkpoints


class EcospaVLLMGPT2Attention(nn.Module):
    def __init__(self, config, layer: LayerSpec, head_size: int,
                 cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        _, tp = tp_rank_and_size()
        self.c_attn = qkv_linear(config.n_embd, layer, True, quant_config, f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(layer.o_width, config.n_embd, bias=True,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")
        self.attn = PaddedAttention(layer, head_size, tp, cache_config, quant_config,
                                    f"{prefix}.attn")
        self.sizes = [layer.q_width // tp, layer.k_width // tp, layer.v_width // tp]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.split(self.sizes, dim=-1)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class EcospaVLLMGPT2MLP(nn.Module):
    def __init__(self, config, layer: LayerSpec, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.n_embd, layer.intermediate_size, bias=True,
                                         quant_config=quant_config, prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(layer.intermediate_size, config.n_embd, bias=True,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.c_fc(x)
        x, _ = self.c_proj(self.act(x))
        return x


class EcospaVLLMGPT2Block(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        index = extract_layer_index(prefix)
        layer = config.ecospa_spec.layers[index]
        quant = vllm_config.quant_config
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = EcospaVLLMGPT2Attention(config, layer,
                                            attention_head_sizes(config.ecospa_spec)[index],
                                            vllm_config.cache_config, quant, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = EcospaVLLMGPT2MLP(config, layer, quant, f"{prefix}.mlp")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# Annotations are strings here (postponed evaluation), so name the dynamic token axis.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class EcospaVLLMGPT2Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_spec(config.ecospa_spec, vllm_config.parallel_config.tensor_parallel_size)
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd,
                                          quant_config=vllm_config.quant_config,
                                          prefix=f"{prefix}.wte")
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.start_layer, self.end_layer, self.h = make_layers(
            config.n_layer, lambda prefix: EcospaVLLMGPT2Block(vllm_config, prefix),
            prefix=f"{prefix}.h")
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.n_embd)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states = inputs_embeds + self.wpe(positions)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for block in self.h[self.start_layer:self.end_layer]:
            hidden_states = block(hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.ln_f(hidden_states)


class EcospaGPT2ForVLLM(CausalLMForVLLM):
    """Registered as vLLM architecture ``EcospaGPT2LMHeadModel``."""

    inner_cls, inner_name, embedding_name = EcospaVLLMGPT2Model, "transformer", "wte"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._splits = [(layer.q_width, layer.k_width, layer.v_width)
                        for layer in self.config.ecospa_spec.layers]

    def _expand(self, name: str, tensor: torch.Tensor) -> Iterator[Loadable]:
        if name.endswith(IGNORED) or (name == "lm_head.weight"
                                      and self.config.tie_word_embeddings):
            return
        if ".attn.c_attn." in name:
            layer = int(name.split(".h.")[1].split(".")[0])
            if name.endswith(".weight"):
                tensor = tensor.t()
            for shard, piece in enumerate(tensor.split(self._splits[layer], dim=0)):
                yield name, piece, shard
            return
        if name.endswith(CONV1D):
            tensor = tensor.t()
        yield name, tensor, None


__all__ = ["EcospaGPT2ForVLLM"]
