"""The TTFT floor of a burst (``bench/floor.py``): the bound the serve benchmark's TTFT is read
against, so its arithmetic is checked here by hand."""

from __future__ import annotations

import pytest

from ecospa_deploy.benchmark.floor import burst_ttft_floor_s, prefill_flops
from ecospa_deploy.testing import tiny_pruned


def test_burst_floor_is_the_shortest_first_prefix_sum_of_prefill_flops():
    spec = tiny_pruned("llama", seed=1).config.ecospa_spec
    params, peak = 1000, 1e9
    lengths = [30, 5, 12, 5]
    got = burst_ttft_floor_s(spec, params, lengths, peak)
    f = {n: prefill_flops(spec, params, 1, n) for n in set(lengths)}
    # Order 5, 5, 12, 30 (ties keep arrival order): each waits for all shorter ones.
    want = [2 * f[5] + f[12] + f[30], f[5], 2 * f[5] + f[12], 2 * f[5]]
    assert got == pytest.approx([w / peak for w in want], rel=1e-12)
    assert prefill_flops(spec, params, 1, 12) > 12 / 5 * prefill_flops(spec, params, 1, 5)
