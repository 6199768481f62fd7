"""Property: whatever a client sends, the server answers below 500 and keeps serving.

Random requests of the OpenAI schemas (each field valid, or any JSON value, huge numbers,
lone surrogates), random bytes as bodies, and random bytes as whole HTTP requests go to a
real uvicorn with our protocol over a fake backend (the HTTP layer is what is under test).
Profiles and counts: tests/fuzz_profiles.py.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_profiles import COUNTS, fuzz_settings
from serve_fakes import live_server

HUGE = st.sampled_from([2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 100, 10 ** 4000, -10 ** 4000])
TEXT = st.text(st.characters(codec=None), max_size=40)  # includes lone surrogates
JSON = st.recursive(st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=False)
                    | TEXT, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)


def field(valid):
    """A field's value: usually plausible, sometimes any JSON at all."""
    return st.one_of(valid, valid, valid, valid, valid, valid, JSON)


SAMPLING = {
    "model": field(st.sampled_from(["fake", "other"])),
    "max_tokens": field(st.integers(-2, 80)),
    "temperature": field(st.floats(-1, 3, allow_nan=False)),
    "top_p": field(st.floats(-0.5, 1.5, allow_nan=False)),
    "n": field(st.integers(-1, 20)),
    "stop": field(st.lists(TEXT, max_size=5) | TEXT),
    "seed": field(st.integers(-(2 ** 64), 2 ** 64)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()),
    "presence_penalty": field(st.just(0)),
    "logit_bias": field(st.just({})),
    "user": field(TEXT),
    "bogus": JSON,
}
PROMPT = field(st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(-5, 200),
                                                                     max_size=8),
                         st.lists(st.lists(st.integers(0, 100), max_size=4), max_size=3)))
MESSAGE = field(st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant", "wizard"]))},
    optional={"content": field(TEXT | st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": TEXT}), max_size=2)), "name": TEXT}))


def _request(extra: dict):
    return st.fixed_dictionaries({}, optional={**SAMPLING, **extra})


COMPLETION = _request({"prompt": PROMPT, "echo": field(st.booleans()),
                       "logprobs": field(st.none()), "suffix": field(st.none())})
CHAT = _request({"messages": field(st.lists(MESSAGE, max_size=3)),
                 "max_completion_tokens": field(st.integers(-1, 80)),
                 "response_format": field(st.just({"type": "text"}))})


@pytest.fixture(scope="module")
def server():
    with live_server(max_queue=8, batch=4, read_timeout=5.0) as (url, sched):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield url, client, sched
        assert sched.alive


def _check(resp: httpx.Response, what: str) -> None:
    COUNTS[what] += 1
    COUNTS[f"status_{resp.status_code // 100}xx"] += 1
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400 and resp.status_code != 499 and resp.request.method != "HEAD":
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert "server_error" not in resp.text, resp.text[:500]


def _dump(body) -> bytes:
    # ensure_ascii writes lone surrogates as \\udXXX escapes, as a careless client would
    return json.dumps(body, ensure_ascii=True).encode()


@fuzz_settings(150, 4500)
@given(body=COMPLETION)
def test_fuzz_completions(server, body):
    _, client, _ = server
    _check(client.post("/v1/completions", content=_dump(body)), "completions")


@fuzz_settings(100, 3000)
@given(body=CHAT)
def test_fuzz_chat(server, body):
    _, client, _ = server
    _check(client.post("/v1/chat/completions", content=_dump(body)), "chat")


@fuzz_settings(100, 3000)
@given(raw=st.binary(max_size=300) | JSON.map(_dump),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                             "/health", "/metrics", "/nope"]),
       method=st.sampled_from(["POST", "GET", "PUT", "HEAD"]))
def test_fuzz_raw_bodies(server, raw, path, method):
    _, client, _ = server
    _check(client.request(method, path, content=raw), "raw_bodies")


@fuzz_settings(50, 1000)
@given(head=st.binary(max_size=200), length=st.one_of(st.integers(-5, 10 ** 20).map(str),
                                                      TEXT, st.just("")))
def test_fuzz_raw_http(server, head, length):
    """Random bytes where the request line and headers go; the reply, when there is one, is
    an HTTP response below 500."""
    url, client, _ = server
    host, port = url.removeprefix("http://").split(":")
    data = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + length.encode("utf-8", "replace") + b"\r\n" + head + b"\r\n\r\n{}")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    COUNTS["raw_http"] += 1
    if reply:
        status = int(reply.split()[1])
        COUNTS[f"status_{status // 100}xx"] += 1
        assert status < 500, reply[:500]


def test_still_alive_after_fuzzing(server):
    _, client, sched = server
    assert client.get("/health").status_code == 200 and sched.alive
    ok = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
