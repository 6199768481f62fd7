"""Tiny random models and masks for tests, examples and the converters' parity checks.

Every weight (biases and norms included) is random, so a mis-sliced or mis-padded tensor
always shows in the logits; zero-initialised biases would hide exactly those bugs.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from ecospa_deploy.modeling import from_hf
from ecospa_deploy.prune.mask import LayerMask, pairs_to_dims

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 96


def tiny_hf_config(family: str, **overrides: Any):
    """A stock HF config of a few layers with every feature of its family switched on."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":      # GQA + llama3 rope scaling
        cfg = LlamaConfig(**{**common, "num_attention_heads": 8, "num_key_value_heads": 4,
                             "head_dim": 16, "rope_parameters": {
                                 "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}, **overrides})
    elif family == "qwen2":    # qkv bias
        cfg = Qwen2Config(**{**common, "num_attention_heads": 4, "num_key_value_heads": 2,
                             **overrides})
    elif family == "mistral":  # sliding window, MQA
        cfg = MistralConfig(**{**common, "num_attention_heads": 4, "num_key_value_heads": 1,
                               "sliding_window": 6, **overrides})
    elif family == "gpt2":     # Conv1D, fused c_attn, learned positions
        cfg = GPT2Config(**{"vocab_size": VOCAB, "n_embd": 64, "n_layer": 3, "n_head": 4,
                            "n_inner": 96, "n_positions": 128, "bos_token_id": 1,
                            "eos_token_id": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                            "attn_pdrop": 0.0, **overrides})
    else:
        raise ValueError(f"family={family!r}; expected one of {FAMILIES}")
    return cfg


_HF_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
               "mistral": MistralForCausalLM, "gpt2": GPT2LMHeadModel}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Random values in every parameter; norm scales stay near 1 so activations stay sane."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        is_norm = "norm" in name or ".ln_" in name or name.startswith(("transformer.ln_f",))
        p.copy_((1.0 + noise) if is_norm and name.endswith("weight") else noise)
    return model


def tiny_hf(family: str, seed: int = 0, **overrides: Any):
    """A stock HF model with random weights (the "foreign" reference)."""
    torch.manual_seed(seed)
    model = _HF_CLASSES[family](tiny_hf_config(family, **overrides))
    return randomize(model, seed).eval()


def tiny_dense(family: str, seed: int = 0, attn: str = "eager", **overrides: Any):
    """Our model class with a dense spec and random weights (fp32, eval mode)."""
    model = from_hf(tiny_hf(family, seed, **overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def random_masks(model: torch.nn.Module, seed: int = 0, min_keep: float = 0.3,
                 ragged: bool = True) -> list[LayerMask]:
    """A random mask per layer on every axis: heads, KV heads, q/k dims (by rotary pair), v dims, FFN.

    ``ragged`` lets each KV head keep a different set of dims (equal counts).
    """
    rng = random.Random(seed)
    spec = model.config.ecospa_spec

    def subset(n: int, k: int) -> list[int]:
        return sorted(rng.sample(range(n), k))

    def count(n: int) -> int:
        return rng.randint(max(1, int(n * min_keep)), n)

    masks = []
    for layer in spec.layers:
        n_q, n_kv = layer.num_attention_heads, layer.num_key_value_heads
        group = n_q // n_kv
        kv = subset(n_kv, count(n_kv))
        per_group = count(group) if n_q != n_kv else 1
        q = sorted(g * group + j for g in kv for j in subset(group, per_group))
        if spec.rope:
            half = layer.qk_head_dim // 2
            m = count(half)
            qk = [pairs_to_dims(subset(half, m), layer.qk_head_dim) for _ in kv] if ragged \
                else pairs_to_dims(subset(half, m), layer.qk_head_dim)
        else:
            m = count(layer.qk_head_dim)
            qk = [subset(layer.qk_head_dim, m) for _ in kv] if ragged \
                else subset(layer.qk_head_dim, m)
        nv = count(layer.v_head_dim)
        v = [subset(layer.v_head_dim, nv) for _ in kv] if ragged else subset(layer.v_head_dim, nv)
        ffn = subset(layer.intermediate_size, count(layer.intermediate_size))
        masks.append(LayerMask(q_heads=q, kv_heads=None if n_q == n_kv else kv, qk_dims=qk,
                               v_dims=v, ffn=ffn))
    return masks


def tiny_pruned(family: str, seed: int = 0, attn: str = "eager", **overrides: Any):
    """A heterogeneous pruned model: layers differ in heads, q/k dim, v dim and FFN width."""
    from ecospa_deploy.prune.surgery import slice_model

    model = tiny_dense(family, seed, attn, **overrides)
    slice_model(model, random_masks(model, seed))
    return model


__all__ = ["FAMILIES", "tiny_hf_config", "tiny_hf", "tiny_dense", "tiny_pruned",
           "random_masks", "randomize"]


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in a second on a few sentences (ids 0/1/2 = pad/bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    text = ["To be, or not to be, that is the question:",
            "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune,"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
