"""bench/prefill_plan.py: the scheduler's prefill calls laid out as the CUDA engine runs them."""

from __future__ import annotations

import json

import pytest

from ecospa_deploy.bench.prefill_plan import plan


def _prompts(*lengths):
    return [[5] * n for n in lengths]


def test_whole_prompts_share_a_step_and_pad_to_their_buckets():
    """Shortest first: 20 and 40 fit one 1 024-token step and run as one 2-row launch padded to
    64 each; 1 000 waits for the next step (cutting it would chunk it) and pads to 1 024."""
    p = plan(_prompts(1000, 40, 20), [2], step_tokens=1024, max_seq=1280)
    assert (p["prefill_calls"], p["launches"], p["rows"]) == (2, 2, {1: 1, 2: 1})
    assert (p["real_tokens"], p["padded_tokens"]) == (1060, 2 * 64 + 1024)
    # packed: one launch per step, 60 tokens in the 128 bucket, 1 000 in the 1 024 one
    assert p["packed"] == dict(launches=2, padded_tokens=128 + 1024,
                               padded_over_real=round(1152 / 1060, 3))


def test_a_prompt_longer_than_a_step_is_cut_into_unpadded_chunks():
    p = plan(_prompts(2500), [1], step_tokens=1024, max_seq=4096)
    assert (p["prefill_calls"], p["launches"], p["rows"]) == (3, 3, {1: 3})
    assert p["real_tokens"] == p["padded_tokens"] == p["packed"]["padded_tokens"] == 2500


def test_a_larger_step_means_fewer_launches_for_the_burst():
    lengths = range(16, 1025, 16)
    small, large = (plan(_prompts(*lengths), [4], s, 1280) for s in (2048, 8192))
    assert small["real_tokens"] == large["real_tokens"] == sum(lengths)
    assert large["launches"] < small["launches"]
    assert large["prefill_calls"] < small["prefill_calls"]



def test_the_clock_charges_packed_prefills_and_decode_steps():
    """8 192 tokens cost 16 ms, a decode step 1 ms. Step budget 1 024: 20 and 40 prefill in one
    packed launch (bucket 128: 0.25 ms), the 1 000 (bucket 1 024: 2 ms) in the next step, after
    the decode step of the two running streams."""
    burst = _prompts(1000, 40, 20)
    p = plan(burst, [3], step_tokens=1024, max_seq=1280, prefill_ms_8k=16.0, step_ms=1.0)
    assert (p["ttft_p50_ms"], p["ttft_p99_ms"]) == (0.25, 3.25)
    p = plan(burst, [3], step_tokens=1024, max_seq=1280, prefill_ms_8k=16.0)
    assert (p["ttft_p50_ms"], p["ttft_p99_ms"]) == (0.25, 2.25)
    assert "ttft_p50_ms" not in plan(burst, [3], 1024, 1280)      # no costs: no clock


def test_the_clock_charges_each_decode_step_at_its_batch_and_mean_context():
    """20 and 40 prefill in one packed launch (0.25 ms); three tokens each: two decode steps of
    both streams, at mean contexts 30 then 31, each costing 10 ms a stream + context / 10."""
    p = plan(_prompts(40, 20), [3], step_tokens=1024, max_seq=1280, prefill_ms_8k=16.0,
             step_cost=lambda batch, context: 10 * batch + context / 10)
    assert p["wall_ms"] == round(0.25 + 23.0 + 23.1, 2)
    assert p["output_tokens_per_s"] == round(6 / p["wall_ms"] * 1e3, 1)


def test_the_step_table_interpolates_between_and_beyond_its_grid(tmp_path):
    from ecospa_deploy.bench.prefill_plan import interpolated, step_table

    rows = [dict(model=m, batch=b, context=c, ms=b / 8 + c / 100 + (m == "pruned"))
            for m in ("dense", "pruned") for b in (16, 32) for c in (100, 300)]
    log = tmp_path / "profile.log"
    log.write_text("bandwidth 3.0 TB/s\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "profile.json").write_text(json.dumps(dict(ceilings={}, rows=rows)))
    table = step_table(log, "dense")
    assert table == step_table(tmp_path / "profile.json", "dense")
    assert table[32, 300] == 7.0 and step_table(log, "pruned")[32, 300] == 8.0
    cost = interpolated(table)
    assert cost(16, 100) == 3.0                                  # a grid point
    assert cost(24, 200) == pytest.approx(3.0 + 1.0 + 1.0)       # between: bilinear
    assert cost(64, 100) == pytest.approx(9.0)                   # beyond: linear
    with pytest.raises(ValueError, match="no decode-step rows"):
        step_table(log, "other")
    del table[16, 300]
    with pytest.raises(ValueError, match="not a full grid"):
        interpolated(table)
