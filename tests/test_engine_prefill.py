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


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_padded_prefill_gives_the_unpadded_tokens(family, monkeypatch):
    """What the CUDA graphs replay, run eagerly: prompts right-padded to their bucket."""
    model = tiny_pruned(family, seed=6)
    ref = Engine(model, max_batch_size=2, max_seq_len=96)
    pad = Engine(model, max_batch_size=2, max_seq_len=96)
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
