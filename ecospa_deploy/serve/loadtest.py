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

from ecospa_deploy.serve import client as http


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _one(client, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    status, data = await http.post_json(client, "/v1/completions", body)
    out = {"status": status, "latency_s": time.perf_counter() - t0}
    if status == 200:
        out["text"] = data["choices"][0]["text"]
        out["completion_tokens"] = data["usage"]["completion_tokens"]
    else:
        out["error"] = data.get("error", {}).get("message")
    return out


async def run_load(url: str, prompts: list[str], *, requests: int = 64, max_tokens: int = 16,
                   api_key: str | None = None, model: str | None = None,
                   time_cap: float = 120.0) -> dict[str, Any]:
    """Fire ``requests`` completions at once (prompts cycled); all must finish within ``time_cap``."""
    async with http.session(url, connections=requests, timeout=time_cap,
                            api_key=api_key) as client:
        bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": True, **({"model": model} if model else {})}
                  for i in range(requests)]
        before = await http.get_text(client, "/metrics")
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(_one(client, b) for b in bodies)),
                                         time_cap)
        wall = time.perf_counter() - t0
        metrics = await http.get_text(client, "/metrics")
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
        "batch_size": batch_size_stats(metrics, before),
        "results": results,
    }


async def _one_stream(client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: arrival-to-first-token and the time between later tokens."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream(client, "/v1/completions", {**body, "stream": True}) as (status,
                                                                                  lines):
        async for line in lines:
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("text"):       # the closing delta may carry no text
                    stamps.append(time.perf_counter())
    out: dict[str, Any] = {"status": status, "latency_s": time.perf_counter() - t0,
                           "prompt_tokens": len(body["prompt"]), "completion_tokens": len(stamps)}
    if stamps:
        out["ttft_s"] = stamps[0] - t0
    if len(stamps) > 1:
        out["tpot_s"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return out


def token_prompts(requests: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``requests`` token-id prompts of distinct lengths spread over [lo, hi] (seeded ids)."""
    import random

    rng = random.Random(seed)
    span = max(hi - lo, 0)
    lengths = sorted({lo + (span * i) // max(requests - 1, 1) for i in range(requests)})
    lengths += [lo + rng.randrange(span + 1) for _ in range(requests - len(lengths))]
    rng.shuffle(lengths)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


async def run_stream_load(url: str, prompts: list[list[int]], max_tokens: list[int], *,
                          time_cap: float = 300.0, model: str | None = None,
                          api_key: str | None = None) -> dict[str, Any]:
    """All ``prompts`` at once, streamed (``max_tokens`` cycled): TTFT, TPOT and tokens/s.

    A token counts when its stream event carries text, so a tokenizer that decodes some ids to
    nothing under-counts them (bench/serve_gpu.py uses one where every id is a word)."""
    async with http.session(url, connections=len(prompts), timeout=time_cap,
                            api_key=api_key) as client:
        bodies = [{"prompt": p, "max_tokens": max_tokens[i % len(max_tokens)],
                   "temperature": 0, "ignore_eos": True, **({"model": model} if model else {})}
                  for i, p in enumerate(prompts)]
        before = await http.get_text(client, "/metrics")
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(_one_stream(client, b) for b in bodies)), time_cap)
        wall = time.perf_counter() - t0
        metrics = await http.get_text(client, "/metrics")
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r] or [float("nan")]
    tpot = [r["tpot_s"] for r in ok if "tpot_s" in r] or [float("nan")]
    tokens = sum(r["completion_tokens"] for r in ok)
    ms = lambda v: round(1e3 * v, 2)  # noqa: E731
    return {
        "requests": len(prompts), "ok": len(ok), "max_tokens": sorted(set(max_tokens)),
        "prompt_lens": [min(len(p) for p in prompts), max(len(p) for p in prompts)],
        "distinct_prompt_lens": len({len(p) for p in prompts}),
        "wall_s": round(wall, 3), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "ttft_mean_ms": ms(sum(ttft) / len(ttft)),
        "server_ttft_mean_ms": server_ttft_mean_ms(metrics, before),
        "tpot_p50_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
        "batch_size": batch_size_stats(metrics, before),
        "prefill_batch_size": batch_size_stats(metrics, before, "ecospa_prefill_batch_size"),
        "results": results,
    }


def _histogram(metrics_text: str, before: str | None, name: str) -> tuple[float, float, float]:
    """``name``'s count, sum and ``le="1.0"`` bucket in ``metrics_text``, less those in
    ``before`` (the server's counters run over its whole life: warm-up and earlier loads)."""
    def value(pattern: str) -> float:
        def one(text):
            match = re.search(pattern, text or "", re.M)
            return float(match.group(1)) if match else 0.0
        return one(metrics_text) - one(before)

    return (value(rf"^{name}_count (\S+)"), value(rf"^{name}_sum (\S+)"),
            value(rf'^{name}_bucket\{{le="1\.0"\}} (\S+)'))


def batch_size_stats(metrics_text: str, before: str | None = None,
                     name: str = "ecospa_batch_size") -> dict[str, float]:
    """Decode steps, mean sequences per step and steps with more than one sequence (with
    ``name="ecospa_prefill_batch_size"``: prefill calls and whole prompts per call); with
    ``before`` (the /metrics text when the load began) those of the load alone."""
    steps, total, single = _histogram(metrics_text, before, name)
    return {"steps": steps, "mean": round(total / steps, 2) if steps else 0.0,
            "steps_with_more_than_one": steps - single}


def server_ttft_mean_ms(metrics_text: str, before: str | None = None) -> float:
    """Mean TTFT as the scheduler counts it (a sequence's arrival, after tokenizing, to its
    first token): the client's mean less this is the HTTP, tokenizing and streaming side."""
    count, total, _ = _histogram(metrics_text, before, "ecospa_time_to_first_token_seconds")
    return round(1e3 * total / count, 2) if count else float("nan")


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
    p.add_argument("--prompt-lens", default=None, metavar="LO:HI",
                   help="streamed run: token-id prompts of distinct lengths in [LO, HI]; "
                   "reports TTFT/TPOT p50/p99 and output tokens/s")
    p.add_argument("--max-tokens-mix", default=None, metavar="A,B,...",
                   help="with --prompt-lens: max_tokens cycled over the requests")
    p.add_argument("--vocab", type=int, default=1000, help="with --prompt-lens: ids < this")
    args = p.parse_args(argv)
    if args.prompt_lens:
        return _stream_main(args, server_args)
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


def _stream_main(args, server_args: list[str]) -> int:
    try:
        lo, hi = (int(x) for x in args.prompt_lens.split(":"))
        mix = [int(x) for x in (args.max_tokens_mix or str(args.max_tokens)).split(",")]
    except ValueError:
        raise SystemExit(f"--prompt-lens {args.prompt_lens!r} / --max-tokens-mix "
                         f"{args.max_tokens_mix!r}; expected LO:HI and A,B,... integers")
    if not 1 <= lo <= hi or min(mix) < 1:
        raise SystemExit(f"--prompt-lens {lo}:{hi}, --max-tokens-mix {mix}; expected "
                         "1 <= LO <= HI and max_tokens >= 1")
    prompts = token_prompts(args.requests, lo, hi, args.vocab)

    async def go(url: str) -> dict[str, Any]:
        return await run_stream_load(url, prompts, mix, time_cap=args.time_cap,
                                     api_key=args.api_key)

    if args.target.startswith(("http://", "https://")):
        summary = asyncio.run(go(args.target))
    else:
        from ecospa_deploy.serve.process import ServerProcess

        with ServerProcess(args.target, *server_args, startup_timeout=600.0) as srv:
            asyncio.run(run_stream_load(srv.url, prompts[:4], [4], time_cap=args.time_cap,
                                        api_key=args.api_key))
            summary = asyncio.run(go(srv.url))
    summary["server_args"] = server_args
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
