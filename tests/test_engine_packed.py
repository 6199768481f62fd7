"""Packed prefill (prompts end to end, no padding rows): its attention, its buckets and
padding, and the engine's tokens against the padded-row prefill (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecospa_deploy.engine import Engine, SamplingParams
from ecospa_deploy.engine.packing import (packed_bucket, packed_groups, packed_inputs,
                                          packed_max_len, warmup_lengths)
from ecospa_deploy.engine.varlen import kernel_kwargs, reference_varlen
from ecospa_deploy.testing import tiny_pruned


def _block_causal(lengths, window=None):
    """The dense mask packed attention stands for: each prompt causal to itself only."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    d = pos[:, None] - pos[None, :]
    mask = (seq[:, None] == seq[None, :]) & (d >= 0)
    return mask & (d < window) if window else mask


@pytest.mark.parametrize("window", [None, 3])
def test_reference_varlen_is_block_causal_attention(window):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 4]
    t = sum(lengths)
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 6)  # GQA, v dim 6
    got = reference_varlen(q, k, v, lengths, scale=0.3, window=window)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=_block_causal(lengths, window), scale=0.3, enable_gqa=True).transpose(0, 1)
    assert got.shape == (t, 4, 6)
    torch.testing.assert_close(got, want)


def test_kernel_kwargs_say_causal_window_scale_and_gqa():
    params = frozenset({"window_size", "scale", "enable_gqa"})
    assert kernel_kwargs(params, None, 0.5, False) == {"window_size": (-1, 0), "scale": 0.5}
    assert kernel_kwargs(params, 8, 0.5, True) == {"window_size": (7, 0), "scale": 0.5,
                                                   "enable_gqa": True}
    # a torch without enable_gqa: the caller repeats the KV heads instead
    assert "enable_gqa" not in kernel_kwargs(frozenset({"window_size", "scale"}), 8, 1.0, True)


def test_packed_buckets_cover_every_total_with_little_padding():
    widths = set()
    for n in range(1, 16385):
        b = packed_bucket(n)
        assert b >= n and b % 128 == 0 and packed_bucket(b) == b
        if n > 1024:
            assert b < n * 1.125
        widths.add(b)
    assert len([w for w in widths if w <= 2048]) == 16 and len(widths) == 40


def test_packed_groups_keep_order_and_the_token_budget():
    lengths = [3, 5, 9, 9, 17, 30, 31, 64, 65, 200, 7]
    for budget in (1, 16, 64, 128, 4096):
        groups = packed_groups(lengths, budget)
        assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]]
        assert groups[-1][1] == len(lengths)
        for a, b in groups:
            assert b - a == 1 or sum(lengths[a:b]) <= budget
            if b < len(lengths):         # greedy: the next prompt would not have fit
                assert sum(lengths[a:b + 1]) > budget
    assert packed_groups([5] * 7, 4096) == [(0, 7)]


def test_packed_inputs_pad_with_a_sequence_of_their_own_and_add_empty_ones():
    tokens, positions, rows, cu, last = packed_inputs([4, 1], [[7, 8, 9], [5, 6]], width=8,
                                                      rows=4, max_seq=6)
    assert tokens.tolist() == [7, 8, 9, 5, 6, 0, 0, 0]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]    # the padding: after prompt 2
    assert rows.tolist() == [4, 4, 4, 1, 1, 1, 1, 1]         # ... in its cache row
    assert cu.tolist() == [0, 3, 5, 8, 8] and cu.dtype == torch.int32
    assert last.tolist() == [2, 4, 0, 0]
    # padding past the cache's end stays on its last position
    assert packed_inputs([0], [[1, 2]], 6, 2, 4)[1].tolist() == [0, 1, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="do not fit"):
        packed_inputs([0, 1], [[1, 2], [3]], width=2, rows=2, max_seq=8)
    with pytest.raises(ValueError, match="do not fit"):        # no row left for the padding
        packed_inputs([0, 1], [[1, 2], [3]], width=4, rows=2, max_seq=8)


def test_packed_max_len_bounds_every_sequence_of_a_bucket():
    for max_seq in (40, 1280, 4096):
        for total in range(1, 9000, 7):
            width = packed_bucket(total)
            bound = packed_max_len(width, max_seq)
            assert width - total <= bound <= width                # the padding's sequence
            assert bound >= min(width, max_seq - 1)               # any prompt


@pytest.mark.parametrize("max_batch,max_len,budget", [(64, 1279, 8192), (2, 63, 16384),
                                                       (8, 300, 512), (1, 39, 2048)])
def test_warmup_covers_every_bucket_a_prefill_can_reach(max_batch, max_len, budget):
    """``Engine.warmup``'s prompts: one set per bucket that any packed prefill of prompts of
    at most ``max_len`` tokens in distinct slots within ``budget`` lands in, each fitting."""
    most = max(min(budget, max_batch * max_len), max_len)
    plan = warmup_lengths(most, max_len)
    for width, lens in plan.items():
        assert packed_bucket(sum(lens)) == width
        assert len(lens) <= max_batch and all(0 < k <= max_len for k in lens)
    reachable = {packed_bucket(t) for t in range(1, most + 1)}
    assert set(plan) == reachable


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "qwen3"])
def test_bucket_padding_changes_no_logit_and_no_cached_prompt_token(family):
    """What a captured graph runs (tokens padded to the bucket, offsets to every slot), run
    eagerly: the real prompts' logits and cached K/V are those of the exact packing."""
    model = tiny_pruned(family, seed=5, sliding_window=4) if family == "mistral" else \
        tiny_pruned(family, seed=5)
    eng = Engine(model, max_batch_size=4, max_seq_len=40)
    prompts = [[3 + (7 * i + j) % 50 for j in range(n)] for i, n in enumerate((6, 11, 2))]
    slots = [2, 0, 3]

    def run(width, rows):
        eng.cache.setup_caches(eng.weights.layers, 4, 40, eng.dtype, eng.device)
        args = packed_inputs(slots, prompts, width, rows, 40)
        lengths = torch.diff(args[3]).tolist()
        logits = eng.forward.prefill_packed(*args, width, lengths)
        cached = [(k[s, :, :len(p)].clone(), v[s, :, :len(p)].clone())
                  for s, p in zip(slots, prompts) for k, v in zip(eng.cache.k, eng.cache.v)]
        return logits[:len(prompts)], cached

    exact, exact_kv = run(19, 3)
    padded, padded_kv = run(128, 5)          # 109 padding tokens run past the cache's end
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(padded_kv, exact_kv):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "qwen3"])
def test_packed_prefill_gives_the_tokens_of_padded_rows(family):
    """The engine's default on the CPU (packed) against its padded-row prefill, on pruned
    layers of their own shapes: the same generations, first tokens and decode steps."""
    model = tiny_pruned(family, seed=3, sliding_window=8) if family == "mistral" else \
        tiny_pruned(family, seed=3)
    packed = Engine(model, max_batch_size=4, max_seq_len=96, max_prefill_tokens=48)
    rows = Engine(model, max_batch_size=4, max_seq_len=96, packed_prefill=False)
    assert packed.packed_prefill and not rows.packed_prefill
    prompts = [[3 + (5 * i + j) % 40 for j in range(n)] for i, n in enumerate((4, 19, 9, 40))]
    params = [SamplingParams(max_new_tokens=10, temperature=0.8 * (i % 2), seed=i)
              for i in range(4)]
    assert packed.generate(prompts, params) == rows.generate(prompts, params)
    slots = [2, 0, 3, 1]
    assert packed.add_many(slots, prompts, params) == rows.add_many(slots, prompts, params)
    for _ in range(8):
        assert packed.step() == rows.step()


def _masked_varlen(q, k, v, cu, max_len, scale, window=None):
    """The flash kernel's contract from the offsets alone, in plain torch (traceable on the
    CPU): each token attends to its own sequence's tokens up to itself."""
    idx = torch.arange(q.shape[0])
    seq = torch.searchsorted(cu[1:].long(), idx, right=True)
    mask = (seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :])
    if window is not None:
        mask &= idx[:, None] - idx[None, :] < window
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=True).transpose(0, 1)


@pytest.mark.slow
def test_compiled_packed_prefill_traces_whole_and_recompiles_once(monkeypatch):
    """``Engine(compile_prefill=True)`` compiles the packed prefill: with the attention in
    plain torch (the flash op is CUDA-only) it traces with no graph break, the second token
    count makes the count symbolic (two compiles for three buckets), and the logits are the
    eager ones, padding sequence and zero-length sequences included."""
    from torch._dynamo.utils import counters

    from ecospa_deploy.engine import varlen

    monkeypatch.setattr(varlen, "varlen_causal", _masked_varlen)
    torch._dynamo.reset()
    eng = Engine(tiny_pruned("llama", seed=3), max_batch_size=4, max_seq_len=64, compile=True,
                 compile_prefill=True)
    before = dict(counters["stats"]), sum(counters["graph_break"].values())
    for lens, width in (([5, 9, 3], 21), ([20, 11], 35), ([7], 8)):
        prompts = [[3 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate(lens)]
        args = packed_inputs(list(range(len(lens))), prompts, width, 5, 64)
        torch.testing.assert_close(eng._prefill_packed(*args, 64),
                                   eng.forward.prefill_packed(*args, 64), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - before[0].get("unique_graphs", 0) == 2
    assert sum(counters["graph_break"].values()) == before[1]



def test_flash_takes_head_dims_in_multiples_of_8_up_to_256():
    from ecospa_deploy.engine import varlen

    assert varlen.head_dims_fit([64, 128, 256, 24]) and not varlen.head_dims_fit([64, 20])
    assert not varlen.head_dims_fit([320])
