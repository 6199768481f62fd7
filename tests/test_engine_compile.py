"""The compiled decode step on CPU: few compiles across batch and KV buckets, eager tokens."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.engine import Engine, SamplingParams
from ecospa_deploy.testing import tiny_pruned


@pytest.mark.slow
def test_compiled_decode_recompiles_little_and_matches_eager():
    """Dynamo turns the step's batch and KV-length ints symbolic after the second shape, so
    five (batch, KV bucket, greedy/sampled) mixes compile at most three graphs (sampling runs
    outside the compiled part), and every one decodes the eager tokens."""
    from torch._dynamo.utils import counters

    model = tiny_pruned("llama", seed=3)
    eager = Engine(model, max_batch_size=8, max_seq_len=300)
    eng = Engine(model, max_batch_size=8, max_seq_len=300, compile=True)
    before = counters["stats"]["unique_graphs"]
    for n, length, new, temperature in [(2, 5, 4, 0), (3, 130, 4, 0.8), (5, 20, 140, 0.8),
                                        (8, 7, 4, 0), (4, 250, 30, 0.7)]:
        prompts = [[(7 * i + j) % 50 + 1 for j in range(length + i)] for i in range(n)]
        params = SamplingParams(max_new_tokens=new, temperature=temperature, seed=5)
        assert eng.generate(prompts, params) == eager.generate(prompts, params), (n, length)
    assert 2 <= counters["stats"]["unique_graphs"] - before <= 3


def test_decode_warmup_order_changes_batch_and_kv_at_the_second_compiled_shape():
    """``warmup(decode=True)`` visits every decode bucket once; the compiled step's second
    shape differs from its first in both ints, so Dynamo's one recompile makes both symbolic."""
    model = tiny_pruned("llama", seed=3)
    eng = Engine(model, max_batch_size=8, max_seq_len=300, compile=True, kernels=False)
    keys = eng._decode_keys()
    assert sorted(keys) == sorted((nb, kv, s) for nb in (1, 2, 4, 8) for kv in (128, 256, 300)
                                  for s in (False, True))
    (nb0, kv0, _), (nb1, kv1, _) = keys[0], keys[1]
    assert nb0 != nb1 and kv0 != kv1


@pytest.mark.slow
def test_decode_warmup_compiles_a_fixed_few_graphs_not_one_per_bucket():
    """Every decode bucket run in warm-up order (``warmup`` does so on CUDA, capturing each):
    44 (batch, KV) buckets, 5 compiles: the symbolic graph's two, plus what only this CPU path
    specialises (batch 1, which the fused kernels run on CUDA; the KV bucket equal to the
    cache's length, which SDPA slices whole; the CUDA path passes ``kv_len`` to its kernel)."""
    from torch._dynamo.utils import counters

    model = tiny_pruned("llama", seed=4)
    eng = Engine(model, max_batch_size=8, max_seq_len=1300, compile=True, kernels=False)
    keys = eng._decode_keys()
    assert len({(nb, kv) for nb, kv, _ in keys}) == 44
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for key in keys:
            eng._run_decode(*key)
    assert counters["stats"]["unique_graphs"] - before <= 5
