"""Generation's deltas: grouped by wake-up, so a stream that fell behind catches up in one write."""

from __future__ import annotations

import asyncio

import pytest

from ecospa_deploy.serve.errors import APIError
from ecospa_deploy.serve.generation import GenerationService
from ecospa_deploy.serve.protocol import CompletionRequest
from ecospa_deploy.serve.scheduler import TokenEvent
from serve_fakes import tokenizer


class _Queueing:
    """Accepts sequences and runs nothing: the test feeds their events by hand."""

    max_queue = 16

    def submit(self, seqs) -> None:
        self.seqs = seqs


def _words(n: int) -> list[int]:
    tok = tokenizer()
    return [i for i in range(3, len(tok)) if tok.decode([i]).strip().isalpha()][:n]


async def _batches(events: list[tuple[int, TokenEvent]], n: int = 1) -> list:
    service = GenerationService(_Queueing(), tokenizer(), "fake", 64, vocab_size=96,
                                eos_token_ids=(2,), request_timeout=5)
    gen = service.start([[5, 6]], CompletionRequest(prompt=[5, 6], max_tokens=8, n=n), 8)
    for item in events:
        gen._queue.put_nowait(item)
    out = []
    try:
        async for batch in gen.delta_batches():
            out.append([(d.index, d.finish_reason) for d in batch])
    except APIError as exc:
        out.append(exc.status)
    service.close()
    return out


def test_events_queued_together_come_out_as_one_batch():
    ids = _words(3)
    events = [(j, TokenEvent(token=t)) for t in ids for j in (0, 1)]
    events += [(0, TokenEvent(finish="length")), (1, TokenEvent(finish="length"))]
    got = asyncio.run(_batches(events, n=2))
    assert len(got) == 1 and len(got[0]) >= 4           # one write for both choices
    assert [d for d in got[0] if d[1]] == [(0, "length"), (1, "length")]


@pytest.mark.parametrize("end,status", [("shutdown", 503), ("error", 500)])
def test_deltas_before_an_error_still_come_out(end, status):
    ids = _words(3)
    got = asyncio.run(_batches([(0, TokenEvent(token=t)) for t in ids]
                               + [(0, TokenEvent(finish=end, error="gone"))]))
    assert len(got) == 2 and got[0] and got[1] == status


@pytest.mark.parametrize("prompt, threaded", [
    ([5, 6, 7], False), ([[5, 6], [7]], False), ("hello world", True), (["hi", "there"], True)])
def test_only_text_prompts_go_to_the_tokenizer_thread(prompt, threaded):
    """Token ids are checked on the loop (a thread hop per request costs more than the check);
    text goes to the one tokenizer thread. Both give ``encode_completion``'s ids."""
    service = GenerationService(_Queueing(), tokenizer(), "fake", 64, vocab_size=96,
                                eos_token_ids=(2,), request_timeout=5)
    hops = []
    real = service.off_loop

    async def counting(fn, *args):
        hops.append(fn)
        return await real(fn, *args)

    service.off_loop = counting
    req = CompletionRequest(prompt=prompt, max_tokens=4)
    try:
        ids = asyncio.run(service.completion_prompts(req))
    finally:
        service.close()
    assert ids == service.encode_completion(req) and all(ids)
    assert len(hops) == int(threaded)
    bad = CompletionRequest(prompt=[5, 999], max_tokens=4)
    with pytest.raises(APIError, match="outside the vocabulary"):
        asyncio.run(service.completion_prompts(bad))
