"""Engine on CUDA: captured graphs (and torch.compile) give HF's greedy tokens (fp32)."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.engine import Engine, SamplingParams
from ecospa_deploy.testing import slot_join_tokens, tiny_dense, tiny_pruned

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [3] * 9]


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "qwen3"])
@pytest.mark.parametrize("build", [tiny_dense, tiny_pruned])
def test_graph_greedy_matches_hf(family, build, compile):
    model = build(family, seed=3).cuda()
    eng = Engine(model, max_batch_size=4, max_seq_len=64, compile=compile)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    assert out == [_hf_greedy(model, p, 10) for p in PROMPTS]
    # slot API with a request joining mid-way gives the same tokens
    got = slot_join_tokens(eng, (2, PROMPTS[0]), (0, PROMPTS[1]), 10, steps_before_join=3)
    assert got[2] == out[0] and got[0] == out[1]


def test_bf16_close_to_hf():
    model = tiny_pruned("llama", seed=4).cuda().to(torch.bfloat16)
    eng = Engine(model, max_batch_size=2, max_seq_len=64)
    out = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8))[0]
    ref = _hf_greedy(model, PROMPTS[0], 8)
    # bf16 rounding may flip a near-tie late in the sequence; the first tokens must agree.
    assert out[:3] == ref[:3]


def test_prefill_graphs_warmed_for_every_length():
    """After ``warmup`` no prompt length captures again, and the padded graphs give the tokens
    of the eager prefill."""
    from ecospa_deploy.engine.engine import prefill_buckets

    model = tiny_pruned("llama", seed=5).cuda()
    eng = Engine(model, max_batch_size=2, max_seq_len=64)
    n = eng.warmup([1, 2], max_prompt_len=40)
    assert n == len(prefill_buckets(40, 64)) + len(prefill_buckets(40, 64, 2))
    eager = Engine(model, max_batch_size=2, max_seq_len=64, prefill_graphs=False)
    params = SamplingParams(max_new_tokens=6)
    for p in PROMPTS + [[7] * 33]:
        assert eng.generate([p], params) == eager.generate([p], params)
    assert eng.generate(PROMPTS[:2], params) == eager.generate(PROMPTS[:2], params)
    assert len(eng._prefill_graphs) == n


def test_decode_graphs_warmed_for_every_bucket():
    """``warmup(decode=True)`` captures every (batch bucket, KV bucket, greedy/sampled) decode
    graph, so later generation captures none, and the tokens equal eager decoding."""
    model = tiny_pruned("llama", seed=6).cuda()
    eng = Engine(model, max_batch_size=4, max_seq_len=300)
    calls = []
    n = eng.warmup([1], max_prompt_len=40, decode=True,
                   progress=lambda *a: calls.append(a))
    assert set(eng._graphs) == {(nb, kv, s) for nb in (1, 2, 4) for kv in (128, 256, 300)
                                for s in (False, True)}
    assert n == len(eng._graphs) + len(eng._prefill_graphs)
    assert [c[:2] for c in calls] == [(i, n) for i in range(1, n + 1)]   # one call per graph
    assert sum(c[2].startswith("decode batch") for c in calls) == len(eng._graphs)
    captured = set(eng._graphs)
    eager = Engine(model, max_batch_size=4, max_seq_len=300, cuda_graphs=False)
    for params in (SamplingParams(max_new_tokens=6),
                   SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)):
        assert eng.generate(PROMPTS[:3], params) == eager.generate(PROMPTS[:3], params)
    assert set(eng._graphs) == captured


def test_add_many_on_warmed_graphs_gives_eager_tokens_and_captures_nothing():
    """The server's prefill: prompts admitted together run as batches of 1/2/4/... rows on
    graphs ``warmup(prefill_row_counts)`` captured; two batches of the same shape replay one
    graph back to back (its output is copied before the second replay)."""
    model = tiny_pruned("llama", seed=7).cuda()
    eng = Engine(model, max_batch_size=8, max_seq_len=64, max_prefill_rows=2)
    eng.warmup(eng.prefill_row_counts, max_prompt_len=40, decode=True)
    before = (set(eng._prefill_graphs), set(eng._graphs))
    eager = Engine(model, max_batch_size=8, max_seq_len=64, cuda_graphs=False)
    prompts = [[3 + (7 * i + j) % 50 for j in range(n)] for i, n in
               enumerate((5, 6, 12, 13, 30, 2, 33))]
    params = [SamplingParams(max_new_tokens=6, temperature=0.7 * (i % 2), seed=i)
              for i in range(len(prompts))]
    slots = [6, 0, 1, 5, 2, 3, 4]
    want = [eager.add(s, p, q) for s, p, q in zip(slots, prompts, params)]
    assert eng.add_many(slots, prompts, params) == want
    for _ in range(5):
        assert eng.step() == eager.step()
    assert (set(eng._prefill_graphs), set(eng._graphs)) == before


def test_server_backend_compiles_few_graphs_for_every_decode_bucket():
    """``ecospa serve``'s engine (``build_backend``, compile on): warm-up compiles the PyTorch
    decode step twice, not once per (batch, KV) bucket (its second shape changes both ints,
    which Dynamo then makes symbolic), captures every bucket, and decodes the uncompiled engine's tokens,
    greedy and sampled."""
    from torch._dynamo.utils import counters

    from ecospa_deploy.serve.server import build_backend

    model = tiny_pruned("llama", seed=8).cuda()
    before = counters["stats"]["unique_graphs"]
    eng = build_backend("engine", model, 8, 300, torch.device("cuda"), torch.float32)
    compiled = counters["stats"]["unique_graphs"] - before
    buckets = {(nb, kv, s) for nb in (1, 2, 4, 8) for kv in (128, 256, 300) for s in (False, True)}
    assert set(eng._graphs) == buckets
    assert 1 <= compiled <= 2, compiled          # 9 compiled (batch, KV) buckets
    plain = build_backend("engine", model, 8, 300, torch.device("cuda"), torch.float32,
                          compile=False)
    prompts = [[3 + (5 * i + j) % 40 for j in range(n)] for i, n in enumerate((4, 140, 9, 30, 2))]
    for params in (SamplingParams(max_new_tokens=130),
                   SamplingParams(max_new_tokens=20, temperature=0.8, seed=2)):
        assert eng.generate(prompts, params) == plain.generate(prompts, params)
    assert set(eng._graphs) == buckets


@pytest.mark.parametrize("window", [None, 5])
def test_flash_varlen_is_the_reference_packed_attention(window):
    """The flash varlen kernel over packed prompts (grouped KV heads, trailing zero-length
    prompts, a length bound above the longest, as a captured bucket passes) against one SDPA
    per prompt."""
    from ecospa_deploy.engine import varlen

    if not varlen.available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this torch has no flash varlen_attn with scale and window")
    torch.manual_seed(0)
    lengths = [7, 1, 40, 13]
    t = sum(lengths)
    q = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 7, 8, 48, 61, 61, 61], device="cuda", dtype=torch.int32)
    got = varlen.varlen_causal(q, k, v, cu, 128, 0.2, window)
    want = varlen.reference_varlen(q.float(), k.float(), v.float(), lengths, 0.2, window)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_packed_prefill_graphs_warmed_give_eager_tokens_and_capture_nothing():
    """bf16 on CUDA prefills packed by default: ``warmup`` captures one graph per packed-token
    bucket, and prompts admitted together then replay them (padding to the bucket, offsets to
    every slot) with the tokens of the eager packed prefill, greedy and sampled."""
    from ecospa_deploy.engine import varlen

    if not varlen.available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this torch has no flash varlen_attn with scale and window")
    model = tiny_pruned("llama", seed=9).cuda().to(torch.bfloat16)
    eng = Engine(model, max_batch_size=8, max_seq_len=400, max_prefill_tokens=512)
    assert eng.packed_prefill
    eng.warmup(max_prompt_len=300, decode=True)
    assert set(eng._packed_graphs) == {128, 256, 384, 512} and not eng._prefill_graphs
    before = set(eng._packed_graphs)
    eager = Engine(model, max_batch_size=8, max_seq_len=400, max_prefill_tokens=512,
                   prefill_graphs=False)
    prompts = [[3 + (7 * i + j) % 50 for j in range(n)] for i, n in
               enumerate((5, 6, 120, 13, 300, 2, 33))]
    params = [SamplingParams(max_new_tokens=6, temperature=0.7 * (i % 2), seed=i)
              for i in range(len(prompts))]
    slots = [6, 0, 1, 5, 2, 3, 4]
    assert eng.add_many(slots, prompts, params) == eager.add_many(slots, prompts, params)
    for _ in range(5):
        assert eng.step() == eager.step()
    assert set(eng._packed_graphs) == before


def test_compiled_packed_prefill_compiles_twice_for_every_bucket():
    """``compile_prefill=True``: warm-up compiles the packed prefill twice (the token count
    turns symbolic at the second bucket) and captures every bucket from it; its logits are
    the uncompiled ones within bf16 rounding."""
    from torch._dynamo.utils import counters

    from ecospa_deploy.engine import varlen
    from ecospa_deploy.engine.packing import packed_inputs

    if not varlen.available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this torch has no flash varlen_attn with scale and window")
    model = tiny_pruned("llama", seed=10).cuda().to(torch.bfloat16)
    before = counters["stats"]["unique_graphs"]
    eng = Engine(model, max_batch_size=8, max_seq_len=400, max_prefill_tokens=512,
                 compile=True, compile_prefill=True)
    eng.warmup(max_prompt_len=300)
    assert set(eng._packed_graphs) == {128, 256, 384, 512}
    assert counters["stats"]["unique_graphs"] - before == 2
    prompts = [[3 + (7 * i + j) % 50 for j in range(n)] for i, n in enumerate((5, 120, 33))]
    args = [a.cuda() for a in packed_inputs([0, 1, 2], prompts, 256, 9, 400)]
    torch.testing.assert_close(eng._prefill_packed(*args, 400)[:3],
                               eng.forward.prefill_packed(*args, 400)[:3], rtol=0.05, atol=0.05)


def test_packed_prefill_refused_where_flash_cannot_capture_it():
    """fp32 on CUDA (flash varlen is half precision only): padded rows by default, and
    packed_prefill=True refused with what to pass instead."""
    from ecospa_deploy.errors import UnsupportedError

    model = tiny_pruned("llama", seed=2).cuda()
    assert not Engine(model, max_batch_size=2, max_seq_len=32).packed_prefill
    with pytest.raises(UnsupportedError, match="prefill_graphs=False"):
        Engine(model, max_batch_size=2, max_seq_len=32, packed_prefill=True)
    assert Engine(model, max_batch_size=2, max_seq_len=32, prefill_graphs=False,
                  packed_prefill=True).packed_prefill


# ~0.5 s of GPU time at the cards' clocks: far longer than any host work the tests time out.
SLEEP_CYCLES = 1_000_000_000


def test_staged_copies_queue_behind_the_stream_and_blocking_ones_wait():
    from ecospa_deploy.engine.staging import copy_in, to_device

    dev = torch.device("cuda")
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(SLEEP_CYCLES)
    ids = to_device([4, 5, 6], dev)
    buf = torch.zeros(3, dtype=torch.long, device=dev)
    copy_in(buf, torch.tensor([7, 8, 9]))
    assert not stream.query()           # the sleep still runs: neither copy waited for it
    torch.cuda.synchronize()
    assert ids.tolist() == [4, 5, 6] and buf.tolist() == [7, 8, 9]
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.tensor([1, 2], device=dev)    # the control: a pageable copy waits for the stream
    assert stream.query()


def _park_then_collect(model, graphs: bool, sleep: bool) -> tuple[dict, bool]:
    """Slot 0 finishes after one step; step N+1 is launched (behind a GPU sleep, if
    ``sleep``) before step N, which parks slot 0's row, is collected. Returns every token per
    slot, and whether the stream was idle when that collect returned."""
    eng = Engine(model, max_batch_size=4, max_seq_len=64, cuda_graphs=graphs)
    tokens = {0: [eng.add(0, PROMPTS[0], SamplingParams(max_new_tokens=2))],
              1: [eng.add(1, PROMPTS[1], SamplingParams(max_new_tokens=20))]}
    done = [eng.collect(eng.launch())]                    # slot 0's second and last token
    ahead = eng.launch()                                  # slot 1 alone; slot 0 parked
    if sleep:
        torch.cuda._sleep(SLEEP_CYCLES)
    behind = eng.launch()
    done.append(eng.collect(ahead))
    idle = torch.cuda.current_stream().query()
    done += [eng.collect(behind), eng.collect(eng.launch())]
    for step in done:
        for slot, toks in step.items():
            tokens[slot] += toks
    return tokens, idle


@pytest.mark.parametrize("graphs", [False, True])
def test_collect_with_parked_rows_leaves_the_step_launched_ahead_running(graphs):
    """Async decode: step N+1 is launched before step N is collected. Collecting N parks the
    rows of finished slots; that write must queue behind N+1, not wait for it, or the host
    cannot prepare N+2 while the GPU runs N+1."""
    model = tiny_pruned("llama", seed=6).cuda()
    tokens, idle = _park_then_collect(model, graphs, sleep=True)
    assert not idle                      # the sleep still ran: collect did not wait for it
    assert len(tokens[0]) == 2 and len(tokens[1]) == 5
    assert tokens == _park_then_collect(model, graphs, sleep=False)[0]
