"""What the load generator's own HTTP client adds to the TTFT it measures.

``python -m ecospa_deploy.bench.client_overhead --out DIR``: the server of ``bench/serve_host``
(uvicorn, the scheduler, detokenizing, SSE over an instant backend) in a child process, and
the same burst (``--requests`` streams at once, ``--max-tokens`` each) sent in turn by three
clients: httpx (the load generators' client until this was measured), aiohttp (``vllm bench
serve``'s, ours since) and bare asyncio sockets (HTTP/1.1 written by hand: the floor of any
client). The server's work is the same for all three, so the differences in mean TTFT are the
clients'. Writes ``client_overhead.json``: each client's median over ``--repeats`` bursts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path


async def _bare_one(port: int, body: dict) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps({**body, "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: "
                 b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
    first = None
    while (line := await reader.readline()) and not line.startswith(b"data: [DONE]"):
        if first is None and line.startswith(b"data: {") and \
                json.loads(line[6:])["choices"][0].get("text"):
            first = time.perf_counter() - t0
    writer.close()
    return first


async def _httpx_one(client, body: dict) -> float:
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {") and \
                    json.loads(line[6:])["choices"][0].get("text"):
                first = time.perf_counter() - t0
    return first


async def _burst(client: str, url: str, port: int, bodies: list[dict]) -> float:
    """Mean TTFT (ms) of ``bodies`` sent at once by ``client``."""
    if client == "bare":
        ttft = await asyncio.gather(*(_bare_one(port, b) for b in bodies))
    elif client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
            ttft = await asyncio.gather(*(_httpx_one(c, b) for b in bodies))
    else:
        from ecospa_deploy.serve.loadtest import run_stream_load

        run = await run_stream_load(url, [b["prompt"] for b in bodies],
                                    [bodies[0]["max_tokens"]], time_cap=60)
        return run["ttft_mean_ms"]
    return round(1e3 * sum(ttft) / len(ttft), 2)


def main(argv=None) -> int:
    from ecospa_deploy.bench.serve_host import _serve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(sock, args.requests, 0.5), daemon=True)
    proc.start()
    bodies = [{"prompt": [5 + i % 7] * 8, "max_tokens": args.max_tokens, "temperature": 0,
               "ignore_eos": True} for i in range(args.requests)]
    clients = ("httpx", "aiohttp", "bare")
    runs: dict[str, list[float]] = {c: [] for c in clients}
    try:
        asyncio.run(_burst("aiohttp", url, port, bodies[:4]))     # waits for the server
        for _ in range(args.repeats):                             # alternating: same drift
            for c in clients:
                runs[c].append(asyncio.run(_burst(c, url, port, bodies)))
            print(json.dumps({c: v[-1] for c, v in runs.items()}), flush=True)
    finally:
        proc.terminate()
        proc.join(10)
    result = dict(requests=args.requests, max_tokens=args.max_tokens, cpus=os.cpu_count(),
                  median_ttft_mean_ms={c: sorted(v)[len(v) // 2] for c, v in runs.items()},
                  runs=runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "client_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_ttft_mean_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
