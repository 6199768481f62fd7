"""bench/prefill_plan.py: the scheduler's prefill calls laid out as the CUDA engine runs them."""

from __future__ import annotations

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
