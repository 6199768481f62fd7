"""A serving benchmark in ``vllm bench serve``'s terms, against any OpenAI-compatible URL.

    ecospa bench serve --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 1024 --random-output-len 128 --num-prompts 200 \\
        --request-rate 4 --max-concurrency 64 --result-file out.json

The same load runs against ``ecospa-serve``, ``vllm serve`` and ``transformers serve``, so the
numbers compare. Conventions follow vLLM's benchmark (``benchmarks/serve``):

- **datasets**: ``random`` (token-id prompts of ``input_len·[1-r, 1+r]`` tokens, outputs of
  ``output_len·[1-r, 1+r]``, seeded) and ``burst`` (the 64-stream burst of
  ``bench/serve_gpu.py``: distinct prompt lengths spread over ``--burst-prompt-lens``, outputs
  cycled over ``--burst-output-lens``). Prompts are sent as token ids (``/v1/completions``
  accepts them); with ``--tokenizer`` they are decoded to text first, which the chat endpoint
  and servers without id prompts need. Outputs ignore EOS (``ignore_eos``, a vLLM extension the
  server may not know: then requests stop early and the output token counts say so;
  ``--no-ignore-eos`` for a server that refuses the field, as ``transformers serve`` does).
- **arrivals**: ``--request-rate inf`` sends everything at once; a finite rate draws gaps from a
  gamma distribution of shape ``--burstiness`` (1: Poisson), seeded; ``--max-concurrency``
  caps requests in flight (a semaphore, as vLLM does). Several rates in one call make a sweep.
- **metrics** (per rate): completed/failed, duration, input/output tokens, request, output and
  total token throughput, and mean/median/p99 of TTFT, TPOT (``(e2el - ttft)/(out - 1)`` per
  request), ITL (every gap between streamed chunks with content) and E2EL, in milliseconds;
  percentiles interpolate linearly, as ``numpy.percentile`` does. Output tokens are the
  server's ``usage.completion_tokens`` (``stream_options.include_usage``) where it reports them,
  else the number of chunks with content.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecospa_deploy.serve import client as http


@dataclass(frozen=True)
class Request:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass
class Outcome:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                    seed: int = 0) -> list[Request]:
    """vLLM's ``random`` dataset: lengths uniform in ``len·[1-r, 1+r]``, ids uniform, seeded."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio {range_ratio}; expected 0 <= r < 1")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(math.floor(mean * (1 - range_ratio)),
                                  math.ceil(mean * (1 + range_ratio))))

    out = []
    for _ in range(n):
        p, o = length(input_len), length(output_len)
        out.append(Request([rng.randrange(vocab) for _ in range(p)], p, o))
    return out


def burst_requests(n: int, lo: int, hi: int, outputs: list[int], vocab: int, seed: int = 0
                   ) -> list[Request]:
    """The burst of ``bench/serve_gpu.py``: distinct prompt lengths over [lo, hi], outputs
    cycled over ``outputs``."""
    from ecospa_deploy.serve.loadtest import token_prompts

    prompts = token_prompts(n, lo, hi, vocab, seed)
    return [Request(p, len(p), outputs[i % len(outputs)]) for i, p in enumerate(prompts)]


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request: 0 for an infinite rate, else gamma gaps of mean
    ``1/rate`` and shape ``burstiness`` (1: exponential, i.e. a Poisson process)."""
    if rate == math.inf:
        return [0.0] * n
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"request rate {rate}, burstiness {burstiness}; expected both > 0")
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (``numpy.percentile``'s default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _body(req: Request, endpoint: str, model: str | None, ignore_eos: bool = True
          ) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": req.output_len, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if model:
        body["model"] = model
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_has_content(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _send(client, endpoint: str, req: Request, model: str | None,
                ignore_eos: bool = True) -> Outcome:
    out = Outcome(prompt_len=req.prompt_len, start=time.perf_counter())
    stamps: list[float] = []
    usage = None
    try:
        body = _body(req, endpoint, model, ignore_eos)
        async with http.stream(client, endpoint, body) as (status, lines):
            if status != 200:
                out.error = f"HTTP {status}: {' '.join([x async for x in lines])[:200]!r}"
                return out
            async for line in lines:
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if _chunk_has_content(chunk):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except http.ERRORS as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    if not stamps:
        out.error = "the stream carried no content"
        return out
    out.ok = True
    out.ttft = stamps[0] - out.start
    out.e2el = time.perf_counter() - out.start
    out.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    out.output_tokens = int(usage["completion_tokens"]) if usage else len(stamps)
    return out


async def run(base_url: str, requests: list[Request], *, endpoint: str = "/v1/completions",
              rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
              model: str | None = None, api_key: str | None = None, seed: int = 0,
              timeout: float = 600.0, ignore_eos: bool = True) -> dict[str, Any]:
    """Send ``requests`` at ``rate`` (at most ``max_concurrency`` in flight); the metrics."""
    cap = max_concurrency or len(requests)
    gate = asyncio.Semaphore(cap)
    async with http.session(base_url, connections=cap, timeout=timeout,
                            api_key=api_key) as client:

        async def one(req: Request) -> Outcome:
            async with gate:
                return await _send(client, endpoint, req, model, ignore_eos)

        tasks = []
        t0 = time.perf_counter()
        for req, gap in zip(requests, arrival_gaps(len(requests), rate, burstiness, seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(outcomes, duration) | {
        "request_rate": "inf" if rate == math.inf else rate, "burstiness": burstiness,
        "max_concurrency": max_concurrency, "num_prompts": len(requests), "endpoint": endpoint}


def summarize(outcomes: list[Outcome], duration: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    inp = sum(o.prompt_len for o in ok)
    outp = sum(o.output_tokens for o in ok)
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [(o.e2el - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1],
        "itl": [g for o in ok for g in o.itl],
        "e2el": [o.e2el for o in ok],
    }
    result: dict[str, Any] = {
        "completed": len(ok), "failed": len(outcomes) - len(ok),
        "duration": round(duration, 4), "total_input_tokens": inp, "total_output_tokens": outp,
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(outp / duration, 2),
        "total_token_throughput": round((inp + outp) / duration, 2),
        "max_in_flight": _max_in_flight(ok),
    }
    for name, values in series.items():
        ms = [1e3 * v for v in values]
        result[f"mean_{name}_ms"] = round(statistics.fmean(ms), 3) if ms else float("nan")
        result[f"median_{name}_ms"] = round(percentile(ms, 50), 3)
        result[f"p99_{name}_ms"] = round(percentile(ms, 99), 3)
    result["errors"] = sorted({o.error for o in outcomes if o.error})[:5]
    return result


def _max_in_flight(outcomes: list[Outcome]) -> int:
    events = sorted([(o.start, 1) for o in outcomes] + [(o.start + o.e2el, -1) for o in outcomes])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def _rates(text: str) -> list[float]:
    try:
        rates = [math.inf if x.strip() == "inf" else float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--request-rate {text!r}; expected 'inf' or numbers, "
                                         "comma-separated")
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--request-rate {text!r}; expected rates > 0")
    return rates


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecospa bench serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="the 'model' field of each request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", choices=["random", "burst"], default="random")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--burst-prompt-lens", default="16:1024", metavar="LO:HI")
    p.add_argument("--burst-output-lens", default="32,64,128", metavar="A,B,...")
    p.add_argument("--vocab", type=int, default=1000,
                   help="prompt ids are drawn below this (keep it under the model's vocabulary)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos, so every request runs to its output length; "
                   "--no-ignore-eos for servers that refuse the field (transformers serve)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer directory: send prompts as the text of their ids")
    p.add_argument("--request-rate", type=_rates, default=[math.inf],
                   help="requests/s, 'inf' = all at once; comma-separated for a sweep")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-prompts", type=int, default=4,
                   help="requests sent (and not measured) before each measured run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-file", type=Path, default=None)
    return p


def build_requests(args) -> list[Request]:
    if args.num_prompts < 1:
        raise SystemExit(f"--num-prompts {args.num_prompts}; expected >= 1")
    if args.dataset_name == "random":
        reqs = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.vocab, args.seed)
    else:
        try:
            lo, hi = (int(x) for x in args.burst_prompt_lens.split(":"))
            outs = [int(x) for x in args.burst_output_lens.split(",")]
        except ValueError:
            raise SystemExit(f"--burst-prompt-lens {args.burst_prompt_lens!r} / "
                             f"--burst-output-lens {args.burst_output_lens!r}; expected LO:HI "
                             "and A,B,... integers")
        reqs = burst_requests(args.num_prompts, lo, hi, outs, args.vocab, args.seed)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        reqs = [Request(tok.decode(r.prompt), r.prompt_len, r.output_len) for r in reqs]
    return reqs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reqs = build_requests(args)
    kw = dict(endpoint=args.endpoint, model=args.model, api_key=args.api_key,
              max_concurrency=args.max_concurrency, timeout=args.timeout,
              burstiness=args.burstiness, seed=args.seed, ignore_eos=args.ignore_eos)
    runs = []
    for rate in args.request_rate:
        if args.warmup_prompts:
            asyncio.run(run(args.base_url, [Request(r.prompt, r.prompt_len, 4)
                                            for r in reqs[:args.warmup_prompts]], **kw))
        result = asyncio.run(run(args.base_url, reqs, rate=rate, **kw))
        result["dataset"] = args.dataset_name
        runs.append(result)
        print(format_row(result), flush=True)
    doc = {"base_url": args.base_url, "args": {k: (v if not isinstance(v, Path) else str(v))
                                               for k, v in vars(args).items()
                                               if k != "api_key"}, "runs": runs}
    doc["args"]["request_rate"] = ["inf" if r == math.inf else r for r in args.request_rate]
    if args.result_file:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def format_row(r: dict[str, Any]) -> str:
    return (f"rate {r['request_rate']}: {r['completed']}/{r['num_prompts']} ok in "
            f"{r['duration']:.2f} s, {r['output_throughput']:.1f} out tok/s, "
            f"TTFT p50 {r['median_ttft_ms']:.1f} ms p99 {r['p99_ttft_ms']:.1f}, "
            f"TPOT p50 {r['median_tpot_ms']:.2f} ms, ITL p99 {r['p99_itl_ms']:.2f} ms"
            + (f"; errors: {r['errors']}" if r["errors"] else ""))


if __name__ == "__main__":
    sys.exit(main())
