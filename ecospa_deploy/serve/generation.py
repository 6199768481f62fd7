"""From a validated request to text: tokenize, check limits, queue sequences, detokenize.

Shared by both endpoints and by streaming and non-streaming answers: ``Generation`` yields
``Delta(index, text, finish_reason)`` as tokens arrive; the routes only shape them into
OpenAI JSON. Choice ``index`` is ``prompt_index * n + j``, as OpenAI numbers batched prompts.
With a ``seed``, choice ``j`` samples with ``seed + j`` (wrapped into int64) so ``n`` choices
differ but every run repeats.

Tokenizing runs on one worker thread, never on the event loop (a 500 KB prompt takes most of a
second), and text longer than ``max_prompt_bytes`` is refused before it is tokenized: no
tokenizer turns that many bytes into ``max_model_len`` tokens (see ``prompt_byte_limit``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.serve.detokenize import TextStream, decoder
from ecospa_deploy.serve.errors import APIError
from ecospa_deploy.serve.protocol import ChatRequest, CompletionRequest, _Sampling
from ecospa_deploy.serve.scheduler import (NeverFits, QueueFull, Scheduler, Sequence,
                                           ShuttingDown, asyncio_sink)

T = TypeVar("T")
# NFKC and similar normalizers can shrink a character to a quarter of its UTF-8 bytes
# ("\U0001d7cf" -> "1"); the bound below allows for that.
_NORMALIZER_SHRINK = 4


def prompt_byte_limit(tokenizer, max_model_len: int) -> int:
    """UTF-8 bytes of text past which a prompt cannot fit ``max_model_len`` tokens.

    One token stands for at most as many bytes as its vocabulary entry spells (byte-level
    BPE spells each byte with one character, SentencePiece a 1-byte space with 3-byte "▁"),
    times the normalizer's worst shrink. Only a tokenizer that deletes characters outright
    could fit more; such text is refused all the same (documented limit).
    """
    longest = max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()),
                  default=16)
    return max_model_len * max(longest, 1) * _NORMALIZER_SHRINK


def choice_seed(seed: int | None, j: int) -> int | None:
    """``seed + j`` wrapped into int64, the range every backend's generator takes."""
    if seed is None:
        return None
    return (seed + j + (1 << 63)) % (1 << 64) - (1 << 63)


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    finish_reason: str | None = None


class ClientGone(Exception):
    """The client disconnected; nothing is left to answer."""


class GenerationService:
    """Tokenizer + scheduler + limits: everything a route needs to turn a request into text."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, max_model_len: int,
                 vocab_size: int, eos_token_ids: tuple[int, ...],
                 request_timeout: float) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.decode = decoder(tokenizer)      # every stream's detokenizer, chosen once
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.request_timeout = request_timeout
        self.max_prompt_bytes = prompt_byte_limit(tokenizer, max_model_len)
        # One thread: a fast tokenizer must not be used from several threads at once.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="ecospa-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn`` (tokenizing, chat templates) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # -- cheap checks, on the event loop before any tokenizing ----------------------------------
    def check_text_size(self, text_bytes: int, where: str, param: str) -> None:
        if text_bytes > self.max_prompt_bytes:
            raise APIError(400, f"{where} is {text_bytes} bytes of text; at most "
                           f"{self.max_prompt_bytes} bytes can fit this model's maximum "
                           f"context length of {self.max_model_len} tokens", param=param,
                           code="context_length_exceeded")

    def check_sequences(self, count: int) -> None:
        limit = self.scheduler.max_queue
        if count > limit:
            raise APIError(400, f"this request needs {count} sequences (prompts x n) and the "
                           f"queue holds at most {limit} (--max-queue); send fewer prompts or "
                           "a smaller n", param="n")

    def precheck_completion(self, req: CompletionRequest) -> None:
        p = req.prompt
        texts = [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)]
        multi = not isinstance(p, str) and not all(isinstance(x, int) for x in p)
        self.check_sequences((len(p) if multi else 1) * req.n)
        for i, text in enumerate(texts):
            self.check_text_size(len(text.encode("utf-8")),
                                 f"prompt[{i}]" if multi else "prompt", "prompt")

    def precheck_chat(self, req: ChatRequest) -> None:
        self.check_sequences(req.n)
        total = sum(len(m.text().encode("utf-8")) for m in req.messages)
        self.check_text_size(total, "messages", "messages")

    # -- prompts -----------------------------------------------------------------------------
    async def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts as token ids: text is tokenized on the tokenizer thread; a
        prompt of ids only is checked on the loop, since handing it to a thread would cost
        more than the check (a thread wake-up and a GIL hand-off per request, the largest
        items of the event loop's own time in a burst)."""
        p = req.prompt
        if isinstance(p, str) or any(isinstance(x, str) for x in p):
            return await self.off_loop(self.encode_completion, req)
        return self.encode_completion(req)

    def encode_completion(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt is empty; expected a non-empty string or token list",
                           param="prompt")
        out = []
        for i, item in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                if not item:
                    raise APIError(400, f"{where} is an empty string; expected text",
                                   param="prompt")
                ids = list(self.tokenizer(item).input_ids)
            else:
                ids = list(item)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(400, f"{where} has token id {bad[0]} outside the vocabulary "
                                   f"[0, {self.vocab_size})", param="prompt")
            if not ids:
                raise APIError(400, f"{where} is empty; expected at least one token",
                               param="prompt")
            out.append(ids)
        return out

    def encode_chat(self, req: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.model_name!r} has no chat template (its tokenizer "
                           "config defines no chat_template); use /v1/completions with a plain "
                           "prompt instead", param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as exc:  # the template itself may raise (jinja raise_exception)
            raise APIError(400, f"the chat template rejected these messages: {exc}",
                           param="messages") from None
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            raise APIError(400, "messages render to an empty prompt", param="messages")
        return ids

    def max_new_tokens(self, prompt_len: int, requested: int | None) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            if room < 1:
                raise APIError(400, f"this model's maximum context length is "
                               f"{self.max_model_len} tokens and the prompt has {prompt_len}; "
                               "no room is left for the completion", param="messages")
            return room
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} "
                           f"tokens; you requested {prompt_len + requested} ({prompt_len} in "
                           f"the prompt, {requested} for the completion); reduce the prompt "
                           "or max_tokens", param="max_tokens", code="context_length_exceeded")
        return requested

    # -- generation --------------------------------------------------------------------------
    def start(self, prompts: list[list[int]], req: _Sampling,
              limit: int | None) -> "Generation":
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        for field, why in req.unsupported():
            raise APIError(400, why, param=field)
        budgets = [self.max_new_tokens(len(ids), limit) for ids in prompts]
        return Generation(self, prompts, budgets, req)


class Generation:
    """The sequences of one request and their text streams; iterate ``deltas()`` once."""

    def __init__(self, service: GenerationService, prompts: list[list[int]],
                 budgets: list[int], req: _Sampling) -> None:
        self.service = service
        self.prompt_tokens = sum(len(p) for p in prompts) * req.n
        self.completion_tokens = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stops = list(req.stop or [])
        eos = () if req.ignore_eos else service.eos_token_ids
        self.seqs: list[Sequence] = []
        self.texts: list[TextStream] = []
        for ids, budget in zip(prompts, budgets):
            for j in range(req.n):
                params = SamplingParams(
                    max_new_tokens=budget, temperature=float(req.temperature),
                    top_p=float(req.top_p), seed=choice_seed(req.seed, j),
                    stop_token_ids=tuple(eos))
                index = len(self.seqs)
                self.seqs.append(Sequence(ids, params, asyncio_sink(loop, self._queue, index)))
                self.texts.append(TextStream(service.tokenizer, stops, service.decode))
        try:
            service.scheduler.submit(self.seqs)
        except NeverFits as exc:
            raise APIError(400, str(exc), param="n") from None
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc)) from None

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    def _handle(self, index: int, event, open_: set, out: list[Delta]) -> None:
        """One event of choice ``index``: its delta (if any) onto ``out``; an end or an error
        closes the choice or raises."""
        stream = self.texts[index]
        if event.token is not None:
            self.completion_tokens += 1
            text = stream.push(event.token)
            if stream.stopped:
                self.seqs[index].cancel()
                open_.discard(index)
                out.append(Delta(index, text, "stop"))
            elif text:
                out.append(Delta(index, text))
        elif event.finish in ("stop", "length"):
            open_.discard(index)
            out.append(Delta(index, *stream.close(event.finish)))
        elif event.finish == "cancelled":
            raise ClientGone()
        elif event.finish == "shutdown":
            raise APIError(503, f"{event.error}; the request was cut off after "
                           f"{self.completion_tokens} tokens", code="shutting_down")
        else:
            raise APIError(500, event.error or "generation failed")

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text as it is decoded; each choice ends with one delta carrying its finish reason."""
        async for batch in self.delta_batches():
            for delta in batch:
                yield delta

    async def delta_batches(self) -> AsyncIterator[list[Delta]]:
        """``deltas`` grouped by wake-up: everything that arrived by the time the event loop got
        to it (a step's token for each choice; several steps' when the loop fell behind), so
        a stream can be written once per wake-up instead of once per token."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.service.request_timeout
        open_ = set(range(len(self.seqs)))
        try:
            while open_:
                if self._queue.empty():
                    try:
                        async with asyncio.timeout_at(deadline):
                            events = [await self._queue.get()]
                    except TimeoutError:
                        raise APIError(408, f"request timed out after "
                                       f"{self.service.request_timeout} s (--request-timeout)",
                                       code="timeout") from None
                else:
                    events = []
                while not self._queue.empty():
                    events.append(self._queue.get_nowait())
                batch: list[Delta] = []
                error: Exception | None = None
                try:
                    for index, event in events:
                        if index in open_:  # else: events after a stop string ended the choice
                            self._handle(index, event, open_, batch)
                except (APIError, ClientGone) as exc:
                    error = exc
                if batch:   # what came before an error still reaches the client
                    yield batch
                if error is not None:
                    raise error
        finally:
            self.cancel()
