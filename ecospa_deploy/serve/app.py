"""The FastAPI app: OpenAI routes, health, metrics, API key, body limits, error shapes.

Bodies are read and parsed here rather than by FastAPI's model binding so that every failure
(too large, not UTF-8, not JSON, wrong fields or types) becomes a 4xx with OpenAI's error
body, which the ``openai`` client turns into a typed exception carrying our message.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ecospa_deploy.serve.body import read_json
from ecospa_deploy.serve.chunks import Envelope, chat_choice, completion_choice, encode
from ecospa_deploy.serve.errors import APIError, error_body
from ecospa_deploy.serve.generation import ClientGone, Delta, Generation, GenerationService
from ecospa_deploy.serve.metrics import Metrics
from ecospa_deploy.serve.protocol import ChatRequest, CompletionRequest

log = logging.getLogger("ecospa_deploy.serve")

OPEN_ROUTES = ("/health",)
# Metric labels: known routes only, so arbitrary 404 paths cannot grow the label set.
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _error(status: int, message: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class GuardMiddleware:
    """API key on every route but /health (constant-time compare), request counting.

    The scheme is matched case-insensitively ("bearer" works, as RFC 9110 says auth schemes
    are) and spaces around the token are ignored, deliberately: clients differ there.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_ROUTES and \
                    not self._authorized(scope):
                await _error(401, "invalid or missing API key; send 'Authorization: Bearer "
                             "<key>'", code="invalid_api_key")(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self.api_key)
        return False


def parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, f"request body is a JSON {type(data).__name__}; expected an object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields))
            msg = f"unknown field {where!r}; allowed fields: {allowed}"
        else:
            got = err.get("input")
            shown = json.dumps(got)[:80] if not isinstance(got, dict) else "an object"
            msg = f"{where}: {err['msg'].removeprefix('Value error, ')} (got {shown})"
        n = exc.error_count()
        if n > 1:
            msg += f" (and {n - 1} more error{'s' if n > 2 else ''})"
        raise APIError(400, msg, param=where.split(".")[0] if where else None) from None


def _usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {encode(obj)}\n\n"


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    """Cancel the request's sequences (free their slots) when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


async def _collect(request: Request, gen: Generation) -> dict[int, list]:
    """Run a non-streamed generation to the end; {index: [text, finish_reason]}."""
    import asyncio

    out: dict[int, list] = {i: ["", None] for i in range(len(gen.seqs))}
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        async for delta in gen.deltas():
            out[delta.index][0] += delta.text
            if delta.finish_reason:
                out[delta.index][1] = delta.finish_reason
    finally:
        watcher.cancel()
    return out


def _telemetry_config() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (recent FastAPI) asks the global providers whether it is on
    at every request, an environment lookup each: ~5 % of a request's event-loop time
    (bench/results/serve_host/RUNS.md). Off unless the server starts with an ``OTEL_``
    variable set (``opentelemetry-instrument`` sets them), where it stays FastAPI's default."""
    if "telemetry" not in inspect.signature(FastAPI).parameters or \
            any(name.startswith("OTEL_") for name in os.environ):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(service: GenerationService, metrics: Metrics, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, backend_name: str = "") -> FastAPI:
    app = FastAPI(title="ecospa-serve", docs_url=None, redoc_url=None, openapi_url=None,
                  **_telemetry_config())
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.debug("client disconnected while sending %s", request.url.path)
        return Response(status_code=499)  # nobody reads it; counted in the metrics

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if not service.scheduler.alive:
            return _error(503, "the scheduler is not running")
        return JSONResponse({"status": "ok", "model": service.model_name,
                             "backend": backend_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": created,
            "owned_by": "ecospa-deploy", "max_model_len": service.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_json(request, max_body_bytes))
        service.precheck_completion(req)
        prompts = await service.completion_prompts(req)
        gen = service.start(prompts, req, req.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list, usage: dict | None = None) -> dict:
            body = {"id": rid, "object": "text_completion", "created": now,
                    "model": service.model_name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        if req.stream:
            env = Envelope(id=rid, object="text_completion", created=now,
                           model=service.model_name)
            return _stream(gen, completion_choice, req, env)
        try:
            result = await _collect(request, gen)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(chunk([{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                                   for i, (t, f) in sorted(result.items())], _usage(gen)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatRequest, await read_json(request, max_body_bytes))
        service.precheck_chat(req)
        prompt = await service.off_loop(service.encode_chat, req)
        gen = service.start([prompt], req, req.token_limit)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list, usage: dict | None = None) -> dict:
            body = {"id": rid, "object": "chat.completion", "created": now,
                    "model": service.model_name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return body

        if req.stream:
            started: set[int] = set()
            env = Envelope(id=rid, object="chat.completion.chunk", created=now,
                           model=service.model_name)

            def choice(d: Delta) -> str:
                first = d.index not in started
                started.add(d.index)
                return chat_choice(d, first)
            return _stream(gen, choice, req, env)
        try:
            result = await _collect(request, gen)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(chunk([{"index": i, "message": {"role": "assistant", "content": t},
                                    "logprobs": None, "finish_reason": f}
                                   for i, (t, f) in sorted(result.items())], _usage(gen)))

    app.add_middleware(GuardMiddleware, api_key=api_key, metrics=metrics)
    return app


def _stream(gen: Generation, choice, req, env: Envelope) -> StreamingResponse:
    """Server-sent events: one chunk per delta (``env`` around ``choice(delta)``, both JSON
    text: ``serve/chunks.py``), optional usage chunk, then ``[DONE]``. The deltas of one
    wake-up go out in one write (one ASGI message, one socket write), so a stream that fell
    behind catches up with fewer writes rather than falling further behind.

    Errors after the headers are sent (timeout, shutdown) go out as an ``error`` event, the
    way OpenAI's streams report them, followed by ``[DONE]``.
    """
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        try:
            async for batch in gen.delta_batches():
                yield "".join(f"data: {env.chunk(choice(delta))}\n\n" for delta in batch)
            if include_usage:
                yield f"data: {env.chunk('[]', _usage(gen))}\n\n"
        except APIError as exc:
            yield _sse(exc.body())
        except ClientGone:
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
