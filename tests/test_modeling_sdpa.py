"""Our models' SDPA backend choice (no cuDNN: it rebuilds per shape) and the RoPE fast paths."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.modeling import attention
from ecospa_deploy.modeling.attention import (RopeGather, apply_rope, rope_index, rope_layout,
                                              rope_table, sdpa_backends)
from ecospa_deploy.testing import tiny_dense, tiny_pruned


def test_sdpa_backends_scoped_to_the_context():
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()          # the user's setting is back
    with sdpa_backends(torch.device("cpu")):                # CPU: untouched
        assert torch.backends.cuda.cudnn_sdp_enabled()


def _reference_rope(q, k, cos, sin, layer, rope_dim):
    """HF's rotation (``x * cos + rotate_half(x) * sin``), head by head, at each KV head's
    kept dense positions: what every layout must compute."""
    from ecospa_deploy.spec import rope_dim_index

    def rot(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    g = layer.num_attention_heads // layer.num_key_value_heads
    q, k = q.clone(), k.clone()
    for h, kept in enumerate(layer.rope_kept):
        idx = rope_dim_index(kept, rope_dim)
        c, s = cos[:, None][..., idx], sin[:, None][..., idx]
        k[:, h:h + 1] = rot(k[:, h:h + 1], c, s)
        q[:, h * g:(h + 1) * g] = rot(q[:, h * g:(h + 1) * g], c, s)
    return q, k


@pytest.mark.parametrize("ragged", [True, False])
def test_rope_layouts_equal_hf_rotation(ragged):
    """Each layer's views of the one per-forward gather (and a per-head gather of any layer)
    rotate exactly as HF does head by head."""
    from ecospa_deploy.prune.surgery import slice_model
    from ecospa_deploy.testing import random_masks

    dense = tiny_dense("llama", seed=2)
    pruned = tiny_dense("llama", seed=2)
    slice_model(pruned, random_masks(pruned, seed=2, ragged=ragged))
    rope_dim = dense.config.ecospa_spec.dense.head_dim
    seen = set()
    for model in (dense, pruned):
        layers = model.config.ecospa_spec.layers
        freqs = torch.randn(2, 5, rope_dim // 2)
        cos, sin = torch.cat((freqs.cos(),) * 2, -1), torch.cat((freqs.sin(),) * 2, -1)
        table = rope_table(cos, sin)
        rope = RopeGather(layers, rope_dim)
        model(torch.tensor([[1, 2, 3]]))        # a forward picks up the spec surgery set
        torch.testing.assert_close(model.model.rope_gather, rope.index, rtol=0, atol=0)
        gathered = rope.gather(table, rope.index)
        for i, layer in enumerate(layers):
            seen.add(rope_layout(layer, rope_dim))
            g = layer.num_attention_heads // layer.num_key_value_heads
            q = torch.randn(2, layer.num_attention_heads, 5, layer.qk_head_dim)
            k = torch.randn(2, layer.num_key_value_heads, 5, layer.qk_head_dim)
            want = _reference_rope(q, k, cos, sin, layer, rope_dim)
            per_head = table[..., rope_index(layer, rope_dim).flatten()]
            per_head = per_head.unflatten(-1, (layer.num_key_value_heads, -1)).transpose(1, 2)
            for c, s in (rope.layer(i, table, gathered), per_head.chunk(2, dim=-1)):
                torch.testing.assert_close(apply_rope(q, k, c, s, g), want, rtol=1e-6, atol=1e-6)
    assert "dense" in seen and len(seen) >= 2       # the fast paths and a gather were compared


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_never_runs_cudnn_attention(family):
    """Plain ``generate`` of a pruned model: no cuDNN SDPA kernel (it builds a graph per new
    shape), while stock dispatch of the same attention call on this GPU does pick cuDNN."""
    model = tiny_pruned(family, seed=1, attn="sdpa").cuda().to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]], device="cuda")
    q = torch.randn(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    stock = _kernel_names(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, q, q, is_causal=True))
    if not any("cudnn" in n.lower() for n in stock):
        pytest.skip(f"stock SDPA dispatch picks no cuDNN kernel on this GPU: {stock}")
    names = _kernel_names(lambda: model.generate(ids, max_new_tokens=4, do_sample=False,
                                                 pad_token_id=0))
    assert not [n for n in names if "cudnn" in n.lower()]
    assert names                                              # the profiler saw the kernels
    assert torch.backends.cuda.cudnn_sdp_enabled()           # nothing global was switched


def test_tuple_none_restores_stock_dispatch(monkeypatch):
    monkeypatch.setattr(attention, "CUDA_SDPA_BACKENDS", None)
    with sdpa_backends(torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
