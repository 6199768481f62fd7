"""Prefill length buckets and the exactness of right padding to them (CPU)."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.engine import Engine, SamplingParams
from ecospa_deploy.engine.engine import prefill_bucket, prefill_buckets
from ecospa_deploy.testing import tiny_pruned


def test_prefill_buckets_cover_every_length_with_little_padding():
    for n in range(1, 2049):
        b = prefill_bucket(n, 4096)
        assert b >= n and b % 16 == 0
        if n > 128:
            assert b < n * 1.125
    assert len(prefill_buckets(2048, 4096)) == 40
    assert prefill_bucket(2040, 2048) == 2048          # clamped to the cache


def test_several_row_buckets_are_powers_of_two():
    """Batches of several rows pad to a power of two: few graphs per row count."""
    for rows in (2, 4, 8):
        for n in range(1, 1025):
            b = prefill_bucket(n, 4096, rows)
            assert b >= max(n, 16) and b & (b - 1) == 0 and b < 2 * max(n, 16)
    assert prefill_buckets(1024, 4096, 2) == [16, 32, 64, 128, 256, 512, 1024]
    assert prefill_bucket(40, 48, 4) == 48              # clamped to the cache


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_padded_prefill_gives_the_unpadded_tokens(family, monkeypatch):
    """What the CUDA graphs replay, run eagerly: prompts right-padded to their bucket."""
    model = tiny_pruned(family, seed=6)
    ref = Engine(model, max_batch_size=2, max_seq_len=96)
    pad = Engine(model, max_batch_size=2, max_seq_len=96, packed_prefill=False)
    assert not pad.prefill_graphs and pad.warmup() == 0      # CPU: no graphs
    widths = []

    def padded(batch, lengths, idx):
        widths.append(batch.shape[1])
        return pad._prefill_step(batch, lengths, idx)

    pad.prefill_graphs = True
    monkeypatch.setattr(pad, "_run_prefill", padded)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13] * 6]
    params = SamplingParams(max_new_tokens=8)
    assert pad.generate(prompts, params) == ref.generate(prompts, params)
    assert widths == [32]                                  # 18 tokens padded to 32
    first = pad.add(1, prompts[0], params)
    assert first == ref.add(1, prompts[0], params)
    for _ in range(5):
        assert pad.step() == ref.step()


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "qwen3"])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(family):
    """A prompt prefilled a chunk at a time, with another slot decoding between its chunks
    (whose steps run over the parked row), continues exactly as the whole prompt would."""
    model = tiny_pruned(family, seed=7, sliding_window=8) if family == "mistral" else \
        tiny_pruned(family, seed=7)
    ref = Engine(model, max_batch_size=2, max_seq_len=96)
    eng = Engine(model, max_batch_size=2, max_seq_len=96)
    long = [(7 * i) % 50 + 3 for i in range(37)]
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11)
    other = SamplingParams(max_new_tokens=30)
    # the reference: the same schedule, the long prompt prefilled whole at its last chunk;
    # the long prompt's slot (0) lies inside the running slot's (1) decode batch
    want = [ref.add(1, [5, 6, 7], other)] + [ref.step() for _ in range(6)]
    want += [ref.add(0, long, params)] + [ref.step() for _ in range(11)]

    got = [eng.add(1, [5, 6, 7], other)]
    for end in (10, 17, 30):                             # chunks of 10, 7 and 13 tokens
        assert eng.add_chunk(0, long, params, end) is None
        got += [eng.step(), eng.step()]                  # slot 0 does not decode yet
    got += [eng.add_chunk(0, long, params, 37)] + [eng.step() for _ in range(11)]
    assert [set(g) for g in got[1:7]] == [{1}] * 6 and set(got[8]) == {0, 1}
    assert got == want


def test_chunked_prefill_refuses_what_it_cannot_continue():
    eng = Engine(tiny_pruned("llama", seed=1), max_batch_size=2, max_seq_len=64)
    params = SamplingParams(max_new_tokens=4)
    assert eng.add_chunk(0, [3, 4, 5, 6], params, 2) is None
    with pytest.raises(ValueError, match="in use"):
        eng.add(0, [3, 4], params)
    with pytest.raises(ValueError, match="different prompt"):
        eng.add_chunk(0, [3, 4, 5, 7], params, 4)
    with pytest.raises(ValueError, match=r"expected an int in \(2, 4\]"):
        eng.add_chunk(0, [3, 4, 5, 6], params, 2)
    eng.free(0)                                          # a freed slot starts over
    assert isinstance(eng.add_chunk(0, [3, 4, 5, 6], params, 4), int)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_steps_per_sync_give_the_tokens_of_single_steps(family):
    """``steps(n)``: the same tokens as n calls of ``step()``, each slot cut at its own stop
    token or max_new_tokens, and slots that ran past their end do not disturb the others."""
    model = tiny_pruned(family, seed=9)
    one = Engine(model, max_batch_size=4, max_seq_len=64)
    many = Engine(model, max_batch_size=4, max_seq_len=64)
    prompts = {0: [3, 4, 5], 1: [9, 8, 7, 6, 5], 2: [11, 12], 3: [20, 21, 22, 23]}
    params = {0: SamplingParams(max_new_tokens=6),
              1: SamplingParams(max_new_tokens=20, temperature=0.8, seed=4),
              2: SamplingParams(max_new_tokens=3),
              3: SamplingParams(max_new_tokens=20, temperature=1.0, seed=5)}
    want: dict[int, list[int]] = {}
    got: dict[int, list[int]] = {}
    for s in prompts:
        want[s] = [one.add(s, prompts[s], params[s])]
        got[s] = [many.add(s, prompts[s], params[s])]
    while one.active_slots:
        for s, tok in one.step().items():
            want[s].append(tok)
    while many.active_slots:
        for s, toks in many.steps(4).items():
            got[s] += toks
    assert got == want
    assert [len(want[s]) for s in range(4)] == [6, 20, 3, 20]
    # a stop token cuts a slot inside a multi-step call
    stop = want[1][5]
    a = Engine(model, max_batch_size=2, max_seq_len=64)
    p = SamplingParams(max_new_tokens=20, temperature=0.8, seed=4, stop_token_ids=(stop,))
    toks = [a.add(1, prompts[1], p)]
    while a.active_slots:
        toks += a.steps(8)[1]
    assert toks == want[1][:want[1].index(stop) + 1]


@pytest.mark.parametrize("pow2", [False, True])
def test_prefill_groups_respect_rows_tokens_and_order(pow2):
    from ecospa_deploy.engine.engine import prefill_groups

    lengths = [3, 5, 9, 9, 17, 30, 31, 64, 65, 200, 7]
    for max_rows in (1, 2, 3, 8):
        for max_tokens in (16, 64, 128, 4096):
            groups = prefill_groups(lengths, max_rows, max_tokens, pow2)
            assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]]
            assert groups[-1][1] == len(lengths)
            for a, b in groups:
                rows = b - a
                assert 1 <= rows <= max_rows
                assert rows == 1 or rows * max(lengths[a:b]) <= max_tokens
                if pow2:
                    assert rows & (rows - 1) == 0, (groups, max_rows, max_tokens)
    # the padded width counts against the token budget, not the raw length
    assert prefill_groups([17, 17], 8, 40, True, width=lambda t: 32) == [(0, 1), (1, 2)]
    assert prefill_groups([5] * 7, 8, 4096, True) == [(0, 4), (4, 6), (6, 7)]


@pytest.mark.parametrize("graph_rows", [False, True])
def test_add_many_gives_the_tokens_of_one_add_each(graph_rows, monkeypatch):
    """Prompts prefilled together (batches of at most 2 rows here; with graph_rows the
    power-of-two split and right padding that CUDA graphs replay) continue exactly as
    prompts added one at a time, sampled rows included."""
    model = tiny_pruned("llama", seed=8)
    ref = Engine(model, max_batch_size=5, max_seq_len=96)
    eng = Engine(model, max_batch_size=5, max_seq_len=96, max_prefill_rows=2,
                 packed_prefill=False)
    calls = []
    if graph_rows:
        eng.prefill_graphs = True
        monkeypatch.setattr(eng, "_run_prefill", lambda b, n, i: (calls.append(tuple(b.shape)),
                                                                   eng._prefill_step(b, n, i))[1])
    prompts = [[3 + (5 * i + j) % 40 for j in range(n)] for i, n in enumerate((4, 9, 9, 40, 40))]
    params = [SamplingParams(max_new_tokens=10, temperature=0.8 * (i % 2), seed=i)
              for i in range(5)]
    slots = [4, 0, 2, 1, 3]
    want = [ref.add(s, p, q) for s, p, q in zip(slots, prompts, params)]
    assert eng.add_many(slots, prompts, params) == want
    if graph_rows:   # 2 + 2 + 1 rows: several rows pad to a power of two, one row to its bucket
        assert calls == [(2, 16), (2, 64), (1, 48)]
    for _ in range(9):
        assert eng.step() == ref.step()
    assert eng.prefill_row_counts == [1, 2]


def test_add_many_refuses_before_running_anything():
    eng = Engine(tiny_pruned("llama", seed=8), max_batch_size=3, max_seq_len=32)
    ok, params = [3, 4, 5], SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="repeat a slot"):
        eng.add_many([0, 0], [ok, ok], [params, params])
    with pytest.raises(ValueError):
        eng.add_many([0, 1], [ok, list(range(3, 40))], [params, params])   # too long
    with pytest.raises(ValueError, match="one of each"):
        eng.add_many([0, 1], [ok], [params, params])
    assert eng._busy() == []                                 # nothing was claimed
    eng.add(2, ok, params)
    with pytest.raises(ValueError, match="in use"):
        eng.add_many([0, 2], [ok, ok], [params, params])
    assert eng._busy() == [2]
    with pytest.raises(ValueError, match="max_prefill_rows"):
        Engine(tiny_pruned("llama", seed=8), max_prefill_rows=0)
