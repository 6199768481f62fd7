"""A bounded load test: N concurrent completions against a server; throughput and latency.

    python -m ecospa_deploy.serve.loadtest URL_OR_MODEL_DIR [--requests 64] [--max-tokens 16]

Given a model directory it starts ``ecospa serve`` on a free port first (extra server flags
after ``--``). Every request is greedy, so the answers can be checked against a reference;
``/metrics`` is read afterwards to show how many sequences shared each decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    resp = await client.post("/v1/completions", json=body)
    out = {"status": resp.status_code, "latency_s": time.perf_counter() - t0}
    data = resp.json()
    if resp.status_code == 200:
        out["text"] = data["choices"][0]["text"]
        out["completion_tokens"] = data["usage"]["completion_tokens"]
    else:
        out["error"] = data.get("error", {}).get("message")
    return out


async def run_load(url: str, prompts: list[str], *, requests: int = 64, max_tokens: int = 16,
                   api_key: str | None = None, model: str | None = None,
                   time_cap: float = 120.0) -> dict[str, Any]:
    """Fire ``requests`` completions at once (prompts cycled); all must finish within ``time_cap``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=requests + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=time_cap,
                                 limits=limits) as client:
        bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": True, **({"model": model} if model else {})}
                  for i in range(requests)]
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(_one(client, b) for b in bodies)),
                                         time_cap)
        wall = time.perf_counter() - t0
        metrics = (await client.get("/metrics")).text
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok] or [float("nan")]
    tokens = sum(r.get("completion_tokens", 0) for r in ok)
    return {
        "requests": requests, "ok": len(ok), "max_tokens": max_tokens,
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(lat, 50), 3),
        "latency_p99_s": round(percentile(lat, 99), 3),
        "latency_mean_s": round(statistics.fmean(lat), 3),
        "batch_size": batch_size_stats(metrics),
        "results": results,
    }


def batch_size_stats(metrics_text: str) -> dict[str, float]:
    """Decode steps, mean sequences per step and steps with more than one sequence."""
    def value(pattern: str) -> float:
        match = re.search(pattern, metrics_text, re.M)
        return float(match.group(1)) if match else 0.0

    steps = value(r"^ecospa_batch_size_count (\S+)")
    total = value(r"^ecospa_batch_size_sum (\S+)")
    single = value(r'^ecospa_batch_size_bucket\{le="1\.0"\} (\S+)')
    return {"steps": steps, "mean": round(total / steps, 2) if steps else 0.0,
            "steps_with_more_than_one": steps - single}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m ecospa_deploy.serve.loadtest",
                                description=__doc__.strip().splitlines()[0])
    p.add_argument("target", help="server URL (http://...) or a model directory to serve")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--time-cap", type=float, default=300.0)
    p.add_argument("--out", type=Path, help="write the summary JSON here")
    args = p.parse_args(argv)
    prompts = args.prompt or ["To be, or not to be", "The slings and arrows",
                              "Whether 'tis nobler in the mind", "that is the question"]
    if args.target.startswith(("http://", "https://")):
        summary = asyncio.run(run_load(args.target, prompts, requests=args.requests,
                                       max_tokens=args.max_tokens, api_key=args.api_key,
                                       time_cap=args.time_cap))
    else:
        from ecospa_deploy.serve.process import ServerProcess

        with ServerProcess(args.target, *server_args) as srv:
            summary = asyncio.run(run_load(srv.url, prompts, requests=args.requests,
                                           max_tokens=args.max_tokens, api_key=args.api_key,
                                           time_cap=args.time_cap))
    summary["server_args"] = server_args
    brief = {k: v for k, v in summary.items() if k != "results"}
    print(json.dumps(brief, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary["statuses"] = sorted({r["status"] for r in summary.pop("results")})
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
