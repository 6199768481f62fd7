"""The fused Triton decode kernels against plain PyTorch, and the engine built from them.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before any kernel is defined) in fp32, where they must match PyTorch to rounding; the engine
with ``kernels=True`` must then give HF's greedy tokens. With a GPU the same tests run compiled.
(conftest.py sets ``TRITON_INTERPRET=1`` without a GPU, before the kernels are defined.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ecospa_deploy.engine import Engine, SamplingParams  # noqa: E402
from ecospa_deploy.engine import forward as forward_module  # noqa: E402
from ecospa_deploy.engine.kernels import linear as kl  # noqa: E402
from ecospa_deploy.engine.kernels.attention import decode_attention  # noqa: E402
from ecospa_deploy.engine.kernels.attention import decode_attention_op as attention_op  # noqa: E402
from ecospa_deploy.errors import UnsupportedError  # noqa: E402
from ecospa_deploy.testing import tiny_hf, tiny_pruned  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET was set to 0 without a GPU", allow_module_level=True)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _norm(x, g, b, kind):
    if kind == kl.NORM_RMS:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    if kind == kl.NORM_LAYER:
        return F.layer_norm(x, (x.shape[-1],), g, b, 1e-5)
    return x


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("norm_kind", [kl.NORM_NONE, kl.NORM_RMS, kl.NORM_LAYER])
def test_fused_linear_epilogues_match_torch(rows, norm_kind):
    torch.manual_seed(rows)
    k, n = 72, 38                       # neither a multiple of the blocks
    x, w, b = _randn(rows, k) * 3, _randn(n, k), _randn(n)
    g, gb, res = _randn(k), _randn(k), _randn(rows, n)
    nrm = dict(norm=(g, gb if norm_kind == kl.NORM_LAYER else None), norm_kind=norm_kind,
               eps=1e-5)
    ref = _norm(x, g, gb, norm_kind) @ w.T + b
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kl.fused_linear(x, w, b, **nrm), ref, **tol)
    torch.testing.assert_close(kl.fused_linear(x, w, b, **nrm, residual=res), ref + res, **tol)
    pairs = ref.view(rows, n // 2, 2)
    torch.testing.assert_close(kl.fused_linear(x, w, b, **nrm, act=kl.ACT_SILU, gated=True),
                               F.silu(pairs[..., 0]) * pairs[..., 1], **tol)
    for act, fn in ((kl.ACT_GELU_TANH, lambda t: F.gelu(t, approximate="tanh")),
                    (kl.ACT_GELU_ERF, F.gelu), (kl.ACT_RELU, F.relu)):
        torch.testing.assert_close(kl.fused_linear(x, w, b, **nrm, act=act), fn(ref), **tol)


def test_fused_linear_half_precision_uses_the_mma_path():
    torch.manual_seed(0)
    x, w = _randn(20, 64, dtype=torch.float16), _randn(48, 64, dtype=torch.float16) / 8
    assert kl._row_block(20) == (32, True)
    out = kl.fused_linear(x, w, out_dtype=torch.float32)
    torch.testing.assert_close(out, x.float() @ w.float().T, atol=2e-2, rtol=2e-2)


def test_fused_linear_refuses_bad_input():
    with pytest.raises(ValueError, match="rows"):
        kl.fused_linear(_randn(kl.MAX_ROWS + 1, 8), _randn(8, 8))
    with pytest.raises(ValueError, match="even"):
        kl.fused_linear(_randn(1, 8), _randn(7, 8), act=kl.ACT_SILU, gated=True)


def test_fused_qkv_rope_and_cache_write():
    torch.manual_seed(1)
    rows, hidden, H, Hkv, qk, vd, S, D = 3, 32, 4, 2, 6, 10, 16, 8
    a, c, e = H * qk, Hkv * qk, Hkv * vd
    n = a + c + e + 4                                   # 4 padding rows, never stored
    x, w, g = _randn(rows, hidden), _randn(n, hidden), _randn(hidden)
    cos, sin = _randn(S, D), _randn(S, D)
    ridx = torch.randint(0, D, (n,), device=DEVICE, dtype=torch.int32)
    ridx[: a + c] = ridx[: a + c].view(-1, 2)[:, :1].expand(-1, 2).reshape(-1)   # pairs share
    kc, vc = torch.zeros(4, Hkv, S, qk, device=DEVICE), torch.zeros(4, Hkv, S, vd, device=DEVICE)
    pos = torch.tensor([0, 5, 11], device=DEVICE)
    q = kl.fused_qkv(x, w, None, norm=(g, None), norm_kind=kl.NORM_RMS, eps=1e-5,
                     num_heads=H, k_cache=kc, v_cache=vc, positions=pos, rope=(cos, sin, ridx))
    y = _norm(x, g, None, kl.NORM_RMS) @ w.T
    cs, sn = cos[pos][:, ridx.long()], sin[pos][:, ridx.long()]
    rot = torch.stack((-y.view(rows, -1, 2)[..., 1], y.view(rows, -1, 2)[..., 0]), -1)
    y_rot = y * cs + rot.flatten(1) * sn
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q, y_rot[:, :a], **tol)
    for r in range(rows):
        p = int(pos[r])
        torch.testing.assert_close(kc[r, :, p].flatten(), y_rot[r, a:a + c], **tol)
        torch.testing.assert_close(vc[r, :, p].flatten(), y[r, a + c:a + c + e], **tol)
    written = (kc.abs().sum(-1) > 0).nonzero().tolist()
    assert sorted({(b, s) for b, _, s in written}) == [(0, 0), (1, 5), (2, 11)]
    assert vc[3].abs().sum() == 0


@pytest.mark.parametrize("window, splits", [(None, 1), (None, 4), (5, 1), (5, 2)])
def test_decode_attention_matches_sdpa(window, splits):
    torch.manual_seed(2)
    B, H, Hkv, qk, vd, S = 3, 4, 2, 24, 40, 64
    q = _randn(B, H * qk)
    kc, vc = _randn(B, Hkv, S, qk), _randn(B, Hkv, S, vd)
    pos = torch.tensor([0, 17, 63], device=DEVICE)
    out = decode_attention(q, kc, vc, pos, num_heads=H, scale=0.3, window=window, kv_len=64,
                           splits=splits)
    span = torch.arange(S, device=DEVICE)
    mask = span[None] <= pos[:, None]
    if window is not None:
        mask &= span[None] > pos[:, None] - window
    ref = F.scaled_dot_product_attention(
        q.view(B, H, 1, qk), kc.repeat_interleave(2, 1), vc.repeat_interleave(2, 1),
        attn_mask=mask[:, None, None], scale=0.3)
    torch.testing.assert_close(out, ref.reshape(B, H * vd), atol=1e-4, rtol=1e-4)


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_engine_on_fused_kernels_gives_hf_greedy_tokens(family):
    model = tiny_pruned(family, seed=3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eng = Engine(model.to(DEVICE), max_batch_size=2, max_seq_len=32, kernels=True,
                 dtype=torch.float32)
    assert eng.kernels
    out = eng.generate(prompts, SamplingParams(max_new_tokens=8))
    model = model.cpu()
    assert out == [_hf_greedy(model, p, 8) for p in prompts]
    # the stock HF model of the same family too (dense shapes, no ecospa config)
    dense = tiny_hf(family, seed=4)
    eng = Engine(dense.to(DEVICE), max_batch_size=1, max_seq_len=32, kernels=True,
                 dtype=torch.float32)
    assert eng.generate(prompts[:1], SamplingParams(max_new_tokens=6)) == \
        [_hf_greedy(dense.cpu(), prompts[0], 6)]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_pytorch_step_with_kernel_attention_gives_hf_greedy_tokens(family, monkeypatch):
    """Batches above the fused step's run the PyTorch step with the Triton attention op."""
    model = tiny_pruned(family, seed=5)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [11, 12, 13]]     # mistral: window < length
    eng = Engine(model.to(DEVICE), max_batch_size=2, max_seq_len=32, kernels=False,
                 dtype=torch.float32)
    assert not eng.forward.kernel_attention
    eng.forward.kernel_attention = True
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return attention_op(*args)

    monkeypatch.setattr(forward_module, "decode_attention_op", counted)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=8))
    assert len(calls) >= 7 * len(model.config.ecospa_spec.layers)
    assert out == [_hf_greedy(model.cpu(), p, 8) for p in prompts]


def test_engine_refuses_kernels_it_cannot_run():
    model = tiny_pruned("llama", seed=3)
    with pytest.raises(UnsupportedError, match="exceeds"):
        Engine(model, max_batch_size=kl.MAX_ROWS + 1, max_seq_len=16, kernels=True)
    assert not Engine(model, max_batch_size=kl.MAX_ROWS + 1, max_seq_len=16).kernels


def test_qk_norm_models_run_the_pytorch_step():
    """The fused QKV epilogue has no q/k norm (Qwen3): forcing it is a clear error; by default
    the engine keeps the PyTorch step, whose attention may still be the Triton kernel, and the
    tokens are HF's."""
    model = tiny_pruned("qwen3", seed=3)
    with pytest.raises(UnsupportedError, match="q/k norm"):
        Engine(model.to(DEVICE), max_batch_size=1, max_seq_len=32, kernels=True,
               dtype=torch.float32)
    eng = Engine(model.to(DEVICE), max_batch_size=1, max_seq_len=32, dtype=torch.float32)
    assert not eng.kernels and eng._step_fn(1) == eng._decode
    prompt = [5, 6, 7, 8, 9, 10]
    assert eng.generate([prompt], SamplingParams(max_new_tokens=8)) == \
        [_hf_greedy(model.cpu(), prompt, 8)]
