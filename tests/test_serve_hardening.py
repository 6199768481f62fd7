"""The HTTP layer under hostile or careless clients: every client mistake is a 4xx in OpenAI's
error shape, slow or stuck connections are closed, oversized work is refused up front.

A fake slot backend keeps these fast; tests/test_serve_e2e.py runs the same inputs against
the real backends and tests/test_serve_shutdown.py the process-level behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import pytest

from ecospa_deploy.serve.body import MAX_DEPTH
from ecospa_deploy.serve.generation import choice_seed, prompt_byte_limit
from serve_fakes import fake_app, live_server, tokenizer


async def _request(app, method: str, path: str, content: bytes | None = None,
                   headers: dict | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, content=content, headers=headers)


@pytest.fixture(scope="module")
def app():
    app, sched, service = fake_app(max_queue=4)
    yield app
    sched.stop()
    service.close()


def call(app, body: bytes, path: str = "/v1/completions") -> httpx.Response:
    return asyncio.run(_request(app, "POST", path, body))


def assert_openai_error(resp: httpx.Response, status: int, fragment: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err["message"]
    return err


CLIENT_MISTAKES = [
    # lone UTF-16 surrogates: valid JSON, not encodable text
    (b'{"prompt": "\\ud800"}', "/v1/completions", "lone UTF-16 surrogate"),
    (b'{"prompt": ["ok", "a\\udfff"]}', "/v1/completions", "lone UTF-16 surrogate"),
    (b'{"prompt": "ok", "stop": "\\ud800"}', "/v1/completions", "lone UTF-16 surrogate"),
    (b'{"prompt": "ok", "model": "\\ud800"}', "/v1/completions", "lone UTF-16 surrogate"),
    (b'{"\\ud800": 1}', "/v1/completions", "lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions",
     "lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "/v1/chat/completions", "lone UTF-16 surrogate"),
    # nesting and numbers Python cannot handle
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "/v1/completions",
     "nests deeper"),
    (b'{"prompt": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
     "/v1/completions", "nests deeper"),
    (b'{"prompt": "ok", "max_tokens": ' + b"9" * 5000 + b"}", "/v1/completions",
     "not acceptable JSON"),
    (b'{"prompt": "ok", "temperature": NaN}', "/v1/completions", "NaN is not valid JSON"),
    (b'{"prompt": "ok", "top_p": -Infinity}', "/v1/completions", "Infinity is not valid JSON"),
    # seeds past int64, streamed or not
    (b'{"prompt": "ok", "seed": 9223372036854775808}', "/v1/completions", "seed"),
    (b'{"prompt": "ok", "seed": 9223372036854775808, "stream": true}', "/v1/completions",
     "seed"),
    (b'{"prompt": "ok", "seed": -9223372036854775809}', "/v1/completions", "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
     "/v1/chat/completions", "seed"),
    # more sequences than the queue can ever hold (max_queue 4): 400, not "retry later"
    (b'{"prompt": ["a", "b", "c", "d", "e"]}', "/v1/completions", "--max-queue"),
    (b'{"prompt": "a", "n": 5}', "/v1/completions", "--max-queue"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 5}', "/v1/chat/completions",
     "--max-queue"),
    # text that can never fit the context, refused before tokenizing
    (json.dumps({"prompt": "To be " * 100_000}).encode(), "/v1/completions",
     "bytes of text; at most"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 60_000}]}).encode(),
     "/v1/chat/completions", "bytes of text; at most"),
]


@pytest.mark.parametrize("body,path,fragment", CLIENT_MISTAKES,
                         ids=[str(i) for i in range(len(CLIENT_MISTAKES))])
def test_client_mistakes_are_400(app, body, path, fragment):
    assert_openai_error(call(app, body, path), 400, fragment)


def test_still_serving_and_valid_edges_accepted(app):
    # the largest seed is fine (the per-choice seed wraps inside int64)
    ok = call(app, b'{"prompt": "ok", "seed": 9223372036854775807, "n": 2, "max_tokens": 2}')
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    # a valid surrogate pair is just a character (beside text: the tiny test tokenizer has no
    # token for the emoji alone, and an empty prompt is a different 400)
    emoji = call(app, b'{"prompt": "ok \\ud83d\\ude00", "max_tokens": 1}')
    assert emoji.status_code == 200, emoji.text
    nested_ok = call(app, b'{"prompt": [[5, 6]], "max_tokens": 1}')
    assert nested_ok.status_code == 200


def test_head_health_is_200(app):
    resp = asyncio.run(_request(app, "HEAD", "/health"))
    assert resp.status_code == 200 and resp.content == b""


def test_choice_seed_wraps_in_int64():
    top = (1 << 63) - 1
    assert choice_seed(None, 1) is None
    assert choice_seed(5, 2) == 7
    assert choice_seed(top, 1) == -(1 << 63)
    assert all(-(1 << 63) <= choice_seed(top - 3, j) <= top for j in range(16))


def test_prompt_byte_limit_is_a_true_bound():
    tok = tokenizer()
    limit = prompt_byte_limit(tok, 16)
    # text at the limit, made of the vocabulary's longest entry, still needs > 16 tokens...
    longest = max(tok.get_vocab(), key=lambda t: len(t.encode()))
    piece = tok.convert_tokens_to_string([longest])
    text = piece * (limit // len(piece.encode()) + 1)
    assert len(text.encode()) > limit and len(tok(text).input_ids) > 16


def test_api_key_scheme_is_case_insensitive_and_metrics_need_the_key():
    app, sched, service = fake_app(api_key="k1")
    try:
        for header, status in (("Bearer k1", 200), ("bearer k1", 200), ("BEARER  k1 ", 200),
                               ("Bearer k2", 401), ("Basic k1", 401), ("k1", 401)):
            resp = asyncio.run(_request(app, "GET", "/metrics", headers={"Authorization": header}))
            assert resp.status_code == status, header
        assert asyncio.run(_request(app, "GET", "/metrics")).status_code == 401
        assert asyncio.run(_request(app, "HEAD", "/health")).status_code == 200
    finally:
        sched.stop()
        service.close()


# -- a real uvicorn with our protocol, in a thread --------------------------------------------
def _raw(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _json_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1, 2", b"\xb2"])
def test_bad_content_length_gets_openai_error(length):
    with live_server() as (url, _):
        raw = _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                   + b"\r\n\r\n{}")
        status, body = _json_of(raw)
        assert status == 400 and "Content-Length" in body["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200


def test_stalled_uploads_are_closed_with_408(caplog):
    caplog.set_level(logging.INFO)
    with live_server(read_timeout=0.5) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        socks = []
        for i in range(60):
            s = socket.create_connection((host, int(port)), timeout=10)
            if i % 3 == 0:
                pass  # connects and sends nothing
            elif i % 3 == 1:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # half the headers
            else:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                          b"\r\n\r\n{\"prompt\": ")  # a third of the body
            socks.append(s)
        t0 = time.monotonic()
        answers = [_read_all(s) for s in socks]  # returns once the server closes
        assert time.monotonic() - t0 < 8
        for raw in answers:
            status, body = _json_of(raw)
            assert status == 408 and "--read-timeout" in body["error"]["message"]
        for s in socks:
            s.close()
        assert httpx.get(url + "/health").status_code == 200
        # a slow but complete request within the timeout is served
        ok = httpx.post(url + "/v1/completions", json={"prompt": "To be", "max_tokens": 2})
        assert ok.status_code == 200
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


def test_disconnect_mid_body_is_not_an_error(caplog):
    with live_server() as (url, _):
        host, port = url.removeprefix("http://").split(":")
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                          b"\r\n{\"prompt\"")
                time.sleep(0.05)
        time.sleep(0.3)
        metrics = httpx.get(url + "/metrics").text
        assert 'status="500"' not in metrics
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text


def test_connection_cap():
    with live_server(max_connections=4) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
        time.sleep(0.2)
        extra = _raw(url, b"")  # answered on connect (a request sent first may meet a reset)
        status, body = _json_of(extra)
        assert status == 503 and "--max-connections" in body["error"]["message"]
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200


def test_refused_connections_log_one_warning_per_interval(caplog):
    from ecospa_deploy.serve.connections import _RefusalLog

    refusals = _RefusalLog(every=60.0)
    with caplog.at_level("WARNING", logger="ecospa_deploy.serve"):
        for _ in range(500):
            refusals.note(100, 100)
    assert len(caplog.records) == 1 and refusals.suppressed == 499
    refusals.last -= 61
    with caplog.at_level("WARNING", logger="ecospa_deploy.serve"):
        refusals.note(100, 100)
    assert "499 more refused" in caplog.records[-1].getMessage()


def test_fastapi_telemetry_off_unless_opentelemetry_is_configured(monkeypatch):
    """Off, FastAPI skips its per-request provider lookups; an OTEL_ variable keeps its
    default (on where a provider is set up)."""
    import inspect
    import os

    from fastapi import FastAPI

    from ecospa_deploy.serve.app import _telemetry_config

    if "telemetry" not in inspect.signature(FastAPI).parameters:
        assert _telemetry_config() == {}          # an older FastAPI: nothing to turn off
        return
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    off = FastAPI(**_telemetry_config())
    assert not off._native_telemetry.enabled()
    assert (off._telemetry["tracing"], off._telemetry["metrics"]) == (False, False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ecospa")
    assert _telemetry_config() == {}
    assert FastAPI(**_telemetry_config())._telemetry["tracing"] is True
