"""From a validated request to text: tokenize, check limits, queue sequences, detokenize.

Shared by both endpoints and by streaming and non-streaming answers: ``Generation`` yields
``Delta(index, text, finish_reason)`` as tokens arrive; the routes only shape them into
OpenAI JSON. Choice ``index`` is ``prompt_index * n + j``, as OpenAI numbers batched prompts.
With a ``seed``, choice ``j`` samples with ``seed + j`` so ``n`` choices differ but every run
repeats.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.serve.detokenize import TextStream
from ecospa_deploy.serve.errors import APIError
from ecospa_deploy.serve.protocol import ChatRequest, CompletionRequest, _Sampling
from ecospa_deploy.serve.scheduler import (QueueFull, Scheduler, Sequence, ShuttingDown,
                                           asyncio_sink)


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
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.request_timeout = request_timeout

    # -- prompts -----------------------------------------------------------------------------
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
                    top_p=float(req.top_p), seed=None if req.seed is None else req.seed + j,
                    stop_token_ids=tuple(eos))
                index = len(self.seqs)
                self.seqs.append(Sequence(ids, params, asyncio_sink(loop, self._queue, index)))
                self.texts.append(TextStream(service.tokenizer, stops))
        try:
            service.scheduler.submit(self.seqs)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc)) from None

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text as it is decoded; each choice ends with one delta carrying its finish reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.service.request_timeout
        open_ = set(range(len(self.seqs)))
        try:
            while open_:
                try:
                    async with asyncio.timeout_at(deadline):
                        index, event = await self._queue.get()
                except TimeoutError:
                    raise APIError(408, f"request timed out after {self.service.request_timeout}"
                                   " s (--request-timeout)", code="timeout") from None
                if index not in open_:
                    continue  # events after a stop string ended the choice
                stream = self.texts[index]
                if event.token is not None:
                    self.completion_tokens += 1
                    text = stream.push(event.token)
                    if stream.stopped:
                        self.seqs[index].cancel()
                        open_.discard(index)
                        yield Delta(index, text, "stop")
                    elif text:
                        yield Delta(index, text)
                elif event.finish in ("stop", "length"):
                    open_.discard(index)
                    yield Delta(index, *stream.close(event.finish))
                elif event.finish == "cancelled":
                    raise ClientGone()
                else:
                    shutting_down = not self.service.scheduler.alive
                    raise APIError(503 if shutting_down else 500,
                                   event.error or "generation failed")
        finally:
            self.cancel()
