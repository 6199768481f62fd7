"""The load generators' HTTP client: aiohttp, as ``vllm bench serve`` uses.

A load generator's own per-request cost lands in every TTFT it measures: with 64 streams sent
at once from one event loop, each request's connect, send and first read wait behind the
others'. Over a server that costs nothing (``bench/client_overhead.py``: 64 streams of 2 tokens,
2 cores, median of 7) the burst's mean TTFT was 150 ms with httpx's client, 75 ms with aiohttp's
and 75 ms with bare asyncio sockets written by hand: aiohttp is at the floor, and it is the
client of vLLM's benchmark, so our numbers and ``vllm bench serve``'s carry the same client.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp

# errors a request can end in on the client's side (the server's own are HTTP statuses)
ERRORS = (aiohttp.ClientError, TimeoutError, json.JSONDecodeError)


def session(base_url: str, *, connections: int, timeout: float,
            api_key: str | None = None) -> aiohttp.ClientSession:
    """A session for ``connections`` requests in flight at once (each stream holds one) whose
    requests give up after ``timeout`` seconds; paths are relative to ``base_url``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(
        base_url=base_url.rstrip("/") + "/", headers=headers,
        connector=aiohttp.TCPConnector(limit=connections + 4),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=30),
        read_bufsize=1 << 20)      # one SSE line must fit (readline's limit)


def _path(path: str) -> str:
    return path.lstrip("/")        # relative to the session's base_url, which may have a path


async def get_text(client: aiohttp.ClientSession, path: str) -> str:
    async with client.get(_path(path)) as resp:
        return await resp.text()


async def post_json(client: aiohttp.ClientSession, path: str, body: dict[str, Any]
                    ) -> tuple[int, Any]:
    """(status, the decoded JSON body) of a non-streamed POST."""
    async with client.post(_path(path), json=body) as resp:
        return resp.status, json.loads(await resp.read())


@asynccontextmanager
async def stream(client: aiohttp.ClientSession, path: str, body: dict[str, Any]
                 ) -> AsyncIterator[tuple[int, AsyncIterator[str]]]:
    """``async with stream(...) as (status, lines)``: a streamed POST's status and its body's
    lines, decoded, without the line break."""
    async with client.post(_path(path), json=body) as resp:
        async def lines() -> AsyncIterator[str]:
            async for raw in resp.content:
                yield raw.decode().rstrip("\r\n")
        yield resp.status, lines()
