"""Golden invariant (docs/DESIGN.md §3): a sliced model computes exactly what the masked dense model does.

For every family, random masks on every axis (heads, KV heads, q/k dims by rotary pair, v dims,
FFN neurons, per-KV-head ragged dim sets), compared in float32 for prefill, cached decode
(DynamicCache and StaticCache) and greedy ``generate``, with eager and sdpa attention.
Padding is checked the same way: ``logits(pad(m)) == logits(m)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from ecospa_deploy.modeling.kv_cache import output_cache
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import pad_model, slice_model, zero_out
from ecospa_deploy.spec import SpecError
from ecospa_deploy.testing import FAMILIES, VOCAB, cached_decode_logits, random_masks, tiny_dense

ATOL = 2e-5   # float32, logits of magnitude ~1-10


def _pair(family: str, seed: int, attn: str = "eager"):
    dense = tiny_dense(family, seed, attn)
    masks = random_masks(dense, seed)
    ref = copy.deepcopy(dense)
    zero_out(ref, masks)
    sliced = copy.deepcopy(dense)
    slice_model(sliced, masks)
    return ref, sliced


def _tokens(seed: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_sliced_equals_zeroed(family, seed, attn):
    ref, sliced = _pair(family, seed, attn)
    spec = sliced.config.ecospa_spec
    assert any(layer.qk_head_dim != layer.v_head_dim for layer in spec.layers)
    assert len({(l.num_attention_heads, l.qk_head_dim, l.v_head_dim, l.intermediate_size)
                for l in spec.layers}) > 1, "random masks should give heterogeneous layers"
    x = _tokens(seed)
    with torch.no_grad():
        a, b = sliced(x).logits, ref(x).logits
    assert b.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # Slicing really shrank the tensors.
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches(family, cache):
    ref, sliced = _pair(family, 3, "sdpa")
    x = _tokens(3, length=9)
    steps = _tokens(4, length=5)
    logits = []
    for model in (sliced, ref):
        if cache == "dynamic":
            pkv = DynamicCache(config=model.config)
        else:
            pkv = StaticCache(config=model.config, max_cache_len=32)
        logits.append(cached_decode_logits(model, x, steps, pkv))
    torch.testing.assert_close(logits[0], logits[1], atol=ATOL, rtol=0)
    # Cached decode equals a full forward over the whole sequence.
    with torch.no_grad():
        full = sliced(torch.cat([x, steps], 1)).logits[:, x.shape[1] - 1:]
    torch.testing.assert_close(logits[0], full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cache_argument_under_either_spelling(family):
    """transformers renamed ``past_key_values`` to ``cache`` (5.24); ``generate`` passes the
    installed spelling, and a model deaf to it would silently decode without its cache."""
    _, sliced = _pair(family, 4)
    x = _tokens(4)
    with torch.no_grad():
        full = sliced(x).logits[:, -1]
        for name in ("cache", "past_key_values"):
            kv = DynamicCache(config=sliced.config)
            sliced(x[:, :-1], use_cache=True, **{name: kv})
            step = sliced(x[:, -1:], use_cache=True, **{name: kv})
            assert kv.get_seq_length() == x.shape[1]
            assert output_cache(step) is kv
            torch.testing.assert_close(step.logits[:, -1], full, atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="once"):
            sliced(x, cache=kv, past_key_values=kv)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_tokens_identical(family):
    ref, sliced = _pair(family, 5, "sdpa")
    x = _tokens(5, batch=3, length=7)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding in one row
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = sliced.generate(x, **kwargs)
        b = ref.generate(x, **kwargs)
        c = sliced.generate(x, cache_implementation="static", **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_exact(family):
    _, sliced = _pair(family, 6, "sdpa")
    padded = copy.deepcopy(sliced)
    pad_model(padded, qk_multiple=8, v_multiple=8, ffn_multiple=64, kv_heads_multiple=2)
    spec = padded.config.ecospa_spec
    for layer in spec.layers:
        assert layer.qk_head_dim % 8 == 0 and layer.v_head_dim % 8 == 0
        assert layer.intermediate_size % 64 == 0 and layer.num_key_value_heads % 2 == 0
    x = _tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(padded(x).logits, sliced(x).logits, atol=ATOL, rtol=0)


def test_pad_to_one_head_size_everywhere():
    _, sliced = _pair("llama", 7, "sdpa")
    padded = copy.deepcopy(sliced)
    pad_model(padded, qk_head_dim=16, v_head_dim=16)
    assert {(l.qk_head_dim, l.v_head_dim) for l in padded.config.ecospa_spec.layers} == {(16, 16)}
    x = _tokens(7)
    with torch.no_grad():
        torch.testing.assert_close(padded(x).logits, sliced(x).logits, atol=ATOL, rtol=0)


def test_pad_past_the_rotary_dim():
    """Zero q/k pairs beyond the rotary dim (rotated by a reused frequency) change nothing."""
    _, sliced = _pair("llama", 7, "sdpa")
    padded = copy.deepcopy(sliced)
    pad_model(padded, qk_head_dim=24, v_head_dim=32)              # dense head dim is 16
    assert {(l.qk_head_dim, l.v_head_dim) for l in padded.config.ecospa_spec.layers} == {(24, 32)}
    x = _tokens(7)
    with torch.no_grad():
        torch.testing.assert_close(padded(x).logits, sliced(x).logits, atol=ATOL, rtol=0)


def test_slicing_an_already_pruned_model():
    """Masks are relative to current shapes: pruning twice equals one combined zero-out."""
    dense = tiny_dense("llama", 8, "sdpa")
    twice = copy.deepcopy(dense)
    slice_model(twice, random_masks(twice, 8))
    slice_model(twice, random_masks(twice, 9, min_keep=0.5))
    x = _tokens(8)
    # Reference: the second slice's zero-out applied to the once-sliced model.
    once = copy.deepcopy(dense)
    slice_model(once, random_masks(once, 8))
    zero_out(once, random_masks(once, 9, min_keep=0.5))
    with torch.no_grad():
        torch.testing.assert_close(twice(x).logits, once(x).logits, atol=ATOL, rtol=0)


def test_set_attn_implementation_reaches_every_layer():
    _, sliced = _pair("llama", 10, "eager")
    assert sliced.config._attn_implementation == "eager"
    x = _tokens(10)
    seen = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, out: seen.append(out[1] is not None)) for layer in sliced.model.layers]
    with torch.no_grad():
        eager = sliced(x).logits           # the eager kernel returns attention weights
        assert seen == [True] * 3
        sliced.set_attn_implementation("sdpa")
        assert sliced.config._attn_implementation == "sdpa"
        seen.clear()
        torch.testing.assert_close(sliced(x).logits, eager, atol=ATOL, rtol=0)
        assert seen == [False] * 3         # sdpa returns none: every layer switched
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("bad, match", [
    (LayerMask(q_heads=[0, 1, 2]), "unequal GQA groups"),
    (LayerMask(kv_heads=[0], q_heads=[0, 2]), "whose KV head is dropped"),
    (LayerMask(qk_dims=[0, 1, 2]), "not pair-closed"),
    (LayerMask(ffn=[0, 0, 1]), "duplicate"),
    (LayerMask(v_dims=[99]), "out of range"),
    (LayerMask(v_dims=[[0, 1], [0]] + [[0, 1]] * 2), "different KV heads"),
])
def test_bad_masks_name_the_layer(bad, match):
    model = tiny_dense("llama", 0)
    masks = [None, bad, None]
    with pytest.raises(SpecError, match=match) as err:
        slice_model(model, masks)
    assert "layer 1" in str(err.value)
    with pytest.raises(SpecError, match="expected 3"):
        slice_model(model, [None])
