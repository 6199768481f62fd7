"""The one padding rule (ecospa_deploy/padding.py): its pure pieces, and that surgery, the engine
and the vLLM plan all pad to the same shapes with unchanged logits."""

from __future__ import annotations

import copy

import pytest
import torch

from ecospa_deploy.converters.vllm.plan import plan_vllm
from ecospa_deploy.engine import Engine, SamplingParams
from ecospa_deploy.padding import pad_axis, pad_canonical, pad_heads, padded_layer, round_up
from ecospa_deploy.prune.surgery import pad_model
from ecospa_deploy.spec import DenseShape, SpecError
from ecospa_deploy.testing import FAMILIES, VOCAB, tiny_pruned

ATOL = 2e-5


@pytest.mark.parametrize("n, multiple, want", [
    (5, 8, 8), (8, 8, 8), (9, 8, 16), (0, 8, 0), (5, None, 5), (5, 1, 5), (5, 0, 5)])
def test_round_up(n, multiple, want):
    assert round_up(n, multiple) == want


def test_pad_heads_appends_zeros_per_head():
    t = torch.arange(1, 7.0).view(6, 1)                     # 2 heads of 3 rows
    got = pad_heads(t, heads=2, old=3, new=5).flatten().tolist()
    assert got == [1, 2, 3, 0, 0, 4, 5, 6, 0, 0]
    cols = pad_heads(t.view(1, 6), heads=2, old=3, new=4, dim=1).flatten().tolist()
    assert cols == [1, 2, 3, 0, 4, 5, 6, 0]
    assert pad_heads(None, 2, 3, 5) is None
    assert pad_heads(t, 2, 3, 3) is t


def test_pad_heads_rope_keeps_rotary_partners():
    """Rotate-half layout [x_0 x_1 | y_0 y_1]: pair (j, j + d/2) stays a pair after padding."""
    t = torch.tensor([1.0, 2.0, 10.0, 20.0, 3.0, 4.0, 30.0, 40.0]).view(8, 1)  # 2 heads, d=4
    got = pad_heads(t, heads=2, old=4, new=8, rope=True).view(2, 8)
    assert got.tolist() == [[1, 2, 0, 0, 10, 20, 0, 0], [3, 4, 0, 0, 30, 40, 0, 0]]


def test_pad_axis():
    t = torch.ones(2, 3)
    assert pad_axis(t, 5, 1).tolist() == [[1, 1, 1, 0, 0]] * 2
    assert pad_axis(t, 4).shape == (4, 3) and pad_axis(t, 4)[2:].abs().sum() == 0
    assert pad_axis(None, 4) is None and pad_axis(t, 2) is t


def _layer(rope: bool = True):
    dense = DenseShape(4, 2, 8, 12)
    layer = dense.layer(rope=rope).replace(qk_head_dim=4, v_head_dim=6, intermediate_size=10)
    return layer.replace(rope_kept=((1, 3), (0, 2)) if rope else None)


def test_padded_layer_rope_pairs_reuse_frequency_zero():
    layer = _layer()
    new = padded_layer(layer, 8, qk_head_dim=12, v_head_dim=8, intermediate_size=16,
                       num_key_value_heads=3)
    assert (new.num_attention_heads, new.num_key_value_heads) == (6, 3)
    assert (new.qk_head_dim, new.v_head_dim, new.intermediate_size) == (12, 8, 16)
    # qk_head_dim 12 > the rotary dim 8: padded pairs (and whole new groups) use frequency 0
    assert new.rope_kept == ((1, 3, 0, 0, 0, 0), (0, 2, 0, 0, 0, 0), (0,) * 6)
    assert padded_layer(layer, 8) == layer
    plain = padded_layer(_layer(rope=False), None, qk_head_dim=5)
    assert plain.qk_head_dim == 5 and plain.rope_kept is None


@pytest.mark.parametrize("kwargs, match", [
    ({"qk_head_dim": 2}, "layer 3: cannot pad qk_head_dim=4 down to 2"),
    ({"intermediate_size": 9}, "layer 3: cannot pad intermediate_size=10 down to 9"),
    ({"qk_head_dim": 7}, "layer 3: padded qk_head_dim=7 is odd; RoPE needs pairs"),
])
def test_padded_layer_refuses(kwargs, match):
    with pytest.raises(SpecError, match=match):
        padded_layer(_layer(), 8, index=3, **kwargs)


def test_pad_canonical_shapes_follow_the_padded_spec():
    layer = _layer()
    new = padded_layer(layer, 8, qk_head_dim=8, v_head_dim=8, intermediate_size=16,
                       num_key_value_heads=4)
    hidden = 5
    c = {"q": (torch.randn(layer.q_width, hidden), torch.randn(layer.q_width)),
         "k": (torch.randn(layer.k_width, hidden), None),
         "v": (torch.randn(layer.v_width, hidden), None),
         "o": (torch.randn(hidden, layer.o_width), torch.randn(hidden)),
         "gate": (torch.randn(10, hidden), None), "up": (torch.randn(10, hidden), None),
         "down": (torch.randn(hidden, 10), None)}
    out = pad_canonical(c, layer, new, rope=True)
    assert out["q"][0].shape == (new.q_width, hidden) and out["q"][1].shape == (new.q_width,)
    assert out["k"][0].shape == (new.k_width, hidden) and out["k"][1] is None
    assert out["v"][0].shape == (new.v_width, hidden)
    assert out["o"][0].shape == (hidden, new.o_width) and out["o"][1] is c["o"][1]
    assert out["gate"][0].shape == out["up"][0].shape == (16, hidden)
    assert out["down"][0].shape == (hidden, 16)
    for key in c:      # every value is kept, everything added is zero
        w, got = c[key][0], out[key][0]
        assert torch.equal(got[got != 0].sort().values, w.flatten().sort().values)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_model_past_the_rotary_dim_is_exact(family):
    """Head dims padded to 24 (the dense head dim is 16) and two zero KV groups: same logits."""
    model = tiny_pruned(family, 3, "sdpa")
    padded = copy.deepcopy(model)
    spec = pad_model(padded, qk_head_dim=24, v_head_dim=24, ffn_multiple=64,
                     kv_heads_multiple=2)
    assert all(l.qk_head_dim == 24 and l.num_key_value_heads % 2 == 0 for l in spec.layers)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(padded, ids), _logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vllm_plan_and_pad_model_pad_alike(family):
    model = tiny_pruned(family, 4)
    spec = model.config.ecospa_spec
    plan = plan_vllm(spec, tensor_parallel_size=2, attention_backend="cpu")
    padded = pad_model(copy.deepcopy(model), kv_heads_multiple=2, ffn_multiple=2)
    assert padded.layers == plan.padded.layers


def test_engine_pads_past_the_rotary_dim_exactly():
    """A rotary dim of 12 with head_multiple=8: q/k heads pad to 16, past the rotary dim, as
    surgery pads them; tokens equal the unpadded engine's."""
    model = tiny_pruned("llama", 2, head_dim=12)
    spec = model.config.ecospa_spec
    eng = Engine(model, max_batch_size=1, max_seq_len=32, head_multiple=8, pad_multiple=64)
    for lw, layer in zip(eng.weights.layers, spec.layers):
        assert lw.qk_head_dim == round_up(layer.qk_head_dim, 8)
    assert any(lw.qk_head_dim > 12 for lw in eng.weights.layers)
    plain = Engine(model, max_batch_size=1, max_seq_len=32, head_multiple=1, pad_multiple=1)
    prompt, params = [[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=8)
    assert eng.generate(prompt, params) == plain.generate(prompt, params)
