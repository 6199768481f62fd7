"""Qwen3's per-head q/k RMSNorm under pruning: the promise and the weight layout.

The promise (docs/DESIGN.md §3 applied to the norm): pruning q/k dims of a Qwen3 layer, with
different kept dims per KV head, gives the logits of the masked dense model (q_proj/k_proj rows
zeroed). It holds because the norm keeps the dense weights of the kept dims and divides the sum
of squares by the dense head dim (``HeadRMSNorm``); the sliced norm weight is one row per KV
head when heads keep different dims, one shared row (stock layout) while every dense dim stays
(``spec.qk_norm_heads``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen3ForCausalLM

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families import family_of
from ecospa_deploy.loading import load_model
from ecospa_deploy.modeling import from_hf
from ecospa_deploy.padding import head_norm_rows
from ecospa_deploy.prune.mask import LayerMask, pairs_to_dims
from ecospa_deploy.prune.surgery import pad_model, slice_model, zero_out
from ecospa_deploy.spec import ModelSpec, SpecError, qk_norm_heads
from ecospa_deploy.testing import (VOCAB, cached_decode_logits, tiny_dense, tiny_hf,
                                   write_foreign_checkpoint)

ATOL = 2e-5
D = 16      # the tiny Qwen3's dense head dim (8 rotary pairs), 2 KV heads of 2 query heads


def _masks() -> list[LayerMask]:
    """q/k dims only (heads, v dims and FFN whole), so the norm is what is under test:
    layer 0 keeps different pairs per KV head, layer 1 the same pruned pairs in both, layer 2
    drops a whole KV group (every dense dim kept)."""
    return [LayerMask(qk_dims=[pairs_to_dims([0, 2, 5], D), pairs_to_dims([1, 3, 7], D)]),
            LayerMask(qk_dims=pairs_to_dims([0, 1, 4, 6], D)),
            LayerMask(q_heads=[2, 3], kv_heads=[1])]


def _pair(attn: str):
    dense = tiny_dense("qwen3", 0, attn)
    ref = copy.deepcopy(dense)
    zero_out(ref, _masks())
    sliced = copy.deepcopy(dense)
    slice_model(sliced, _masks())
    return ref, sliced


def _tokens(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_layout_rule():
    _, sliced = _pair("eager")
    spec = sliced.config.ecospa_spec
    rows = [qk_norm_heads(layer, D) for layer in spec.layers]
    assert rows == [2, 2, 1]
    for layer, module in zip(spec.layers, sliced.model.layers):
        a = module.self_attn
        n = qk_norm_heads(layer, D) * layer.qk_head_dim
        assert a.q_norm.weight.shape == a.k_norm.weight.shape == (n,)
        assert a.q_norm.divisor == a.k_norm.divisor == D
    # layer 0's rows are the dense weights at each head's own kept dims
    dense = tiny_dense("qwen3", 0)
    w = dense.model.layers[0].self_attn.k_norm.weight
    got = sliced.model.layers[0].self_attn.k_norm.weight.view(2, -1)
    torch.testing.assert_close(got[0], w[pairs_to_dims([0, 2, 5], D)], atol=0, rtol=0)
    torch.testing.assert_close(got[1], w[pairs_to_dims([1, 3, 7], D)], atol=0, rtol=0)
    assert spec.layer_params(spec.layers[0]) == \
        sum(p.numel() for p in sliced.model.layers[0].parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qk_dim_pruning_equals_the_masked_dense_model(attn):
    ref, sliced = _pair(attn)
    spec = sliced.config.ecospa_spec
    assert [l.qk_head_dim for l in spec.layers] == [6, 8, 16]
    x = _tokens(0)
    a, b = _logits(sliced, x), _logits(ref, x)
    assert b.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)

    # The test can fail: the wrong divisor (the layer's own dim), or one shared row where
    # heads kept different dims, both move the logits far beyond the tolerance.
    wrong = copy.deepcopy(sliced)
    for layer in wrong.model.layers[:2]:
        layer.self_attn.q_norm.divisor = layer.self_attn.k_norm.divisor = \
            layer.self_attn.qk_head_dim
    assert (_logits(wrong, x) - b).abs().max() > 100 * ATOL
    wrong = copy.deepcopy(sliced)
    with torch.no_grad():
        attn = wrong.model.layers[0].self_attn
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.view(2, -1)[1] = norm.weight.view(2, -1)[0]
    assert (_logits(wrong, x) - b).abs().max() > 100 * ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decode_equals_the_masked_dense_model(attn):
    ref, sliced = _pair(attn)
    x, steps = _tokens(1, 9), _tokens(2, 5)
    logits = [cached_decode_logits(model, x, steps, DynamicCache(config=model.config))
              for model in (sliced, ref)]
    torch.testing.assert_close(logits[0], logits[1], atol=ATOL, rtol=0)
    full = _logits(sliced, torch.cat([x, steps], 1))[:, x.shape[1] - 1:]
    torch.testing.assert_close(logits[0], full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stock_qwen3_and_ours_agree(attn):
    stock = tiny_hf("qwen3", 3)
    assert isinstance(stock, Qwen3ForCausalLM)
    stock.set_attn_implementation(attn)
    ours = from_hf(copy.deepcopy(stock))
    spec = ours.config.ecospa_spec
    assert spec.qk_norm and spec.to_dict()["qk_norm"] is True
    assert family_of("qwen3").name == "qwen3" and family_of("ecospa_llama").name == "llama"
    # stock names and shapes, one shared row per layer
    assert {k: v.shape for k, v in stock.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    x = _tokens(3)
    torch.testing.assert_close(_logits(ours, x), _logits(stock, x), atol=ATOL, rtol=0)
    gen = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(x[:1], **gen), stock.generate(x[:1], **gen))


def test_padding_past_the_dense_dim_is_exact():
    """Padded like k rows (zeros at the end of both rotary halves, zero KV groups): a shared row
    becomes per-KV-head rows; logits do not move."""
    _, sliced = _pair("eager")
    x = _tokens(4)
    before = _logits(sliced, x)
    padded = pad_model(sliced, qk_head_dim=24, kv_heads_multiple=2)
    assert [qk_norm_heads(l, D) for l in padded.layers] == [2, 2, 2]
    assert all(l.qk_head_dim == 24 for l in padded.layers)
    torch.testing.assert_close(_logits(sliced, x), before, atol=ATOL, rtol=0)


def test_merging_distinct_rows_is_refused():
    grid = torch.arange(8.0)
    with pytest.raises(SpecError, match="differ between KV heads"):
        head_norm_rows(grid, heads=2, rows=1, index=3)
    torch.testing.assert_close(head_norm_rows(torch.ones(8), 2, 1), torch.ones(4))


def test_foreign_qwen3_pruned_by_whole_heads_loads(tmp_path):
    directory, ref = write_foreign_checkpoint(tmp_path, "qwen3", 1)
    model = load_model(directory)
    spec = model.config.ecospa_spec
    assert spec.qk_norm
    assert len({l.num_key_value_heads for l in spec.layers} |
               {l.intermediate_size for l in spec.layers}) > 1
    assert all(m.self_attn.k_norm.weight.shape == (D,) for m in model.model.layers)
    x = _tokens(5)
    torch.testing.assert_close(_logits(model, x), _logits(ref, x), atol=ATOL, rtol=0)


def test_foreign_qwen3_with_a_bad_norm_is_refused():
    stock = tiny_hf("qwen3")
    shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    fam = family_of("qwen3")
    assert fam.infer_spec(stock.config, shapes).qk_norm
    with pytest.raises(CheckpointError, match="q_norm.weight has shape \\[8\\]"):
        fam.infer_spec(stock.config, {**shapes, "model.layers.1.self_attn.q_norm.weight": (8,)})
    del shapes["model.layers.0.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match="missing tensor"):
        fam.infer_spec(stock.config, shapes)


def test_spec_field_reads_old_blocks_and_is_validated():
    spec = tiny_dense("qwen3").config.ecospa_spec
    d = spec.to_dict()
    assert ModelSpec.from_dict(d) == spec
    old = {k: v for k, v in d.items() if k != "qk_norm"}
    assert not ModelSpec.from_dict(old).qk_norm
    assert "qk_norm" not in tiny_dense("llama").config.ecospa_spec.to_dict()
    with pytest.raises(SpecError, match="qk_norm"):
        ModelSpec.from_dict({**d, "qk_norm": "yes"})
    gpt2 = tiny_dense("gpt2").config.ecospa_spec.to_dict()
    with pytest.raises(SpecError, match="without RoPE"):
        ModelSpec.from_dict({**gpt2, "qk_norm": True})
