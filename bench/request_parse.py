"""The API side's cost to accept one completion request: body bytes to a validated request.

``python -m ecospa_deploy.bench.request_parse --out DIR`` times, per prompt of token ids (the
load generators' prompts, ``vllm bench serve``'s too) and per text prompt of as many
characters, what ``/v1/completions`` does before the scheduler sees a request: ``parse_json``
(decode, ``json.loads``, the hostile-body checks) and the pydantic model (``fast_us``). Against
it, in the same run, the full checks (``full_us``): every value walked (``check_json``) and
the prompt validated through the union, as both ran before their fast paths (the walk then
also pushed every id on its stack, slower still). The event loop does this work one request
at a time, so a burst reaches the scheduler spread by the sum of it: ``burst_ms`` is that sum
over ``serve_gpu``'s 64 prompts of 16-1 024 tokens. Writes ``request_parse.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def _per_call_us(fn, repeats: int) -> float:
    for _ in range(max(10, repeats // 10)):
        fn()
    best = float("inf")
    for _ in range(5):                     # best of five rounds: the host's noise only adds
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6


def _paths(raw: bytes):
    from pydantic import TypeAdapter

    from ecospa_deploy.serve.app import parse
    from ecospa_deploy.serve.body import check_json, parse_json
    from ecospa_deploy.serve.protocol import CompletionRequest, Prompt

    union = TypeAdapter(Prompt, config={"strict": True})

    def fast():
        return parse(CompletionRequest, parse_json(raw))

    def full():
        value = json.loads(raw.decode("utf-8"))
        check_json(value)
        union.validate_python(value["prompt"])
        return parse(CompletionRequest, {**value, "prompt": "x"})

    return fast, full


def main(argv=None) -> int:
    from ecospa_deploy.serve.loadtest import token_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    rows = []
    for n in sorted(set(args.tokens) | {16, 1024}):
        for kind, prompt in (("ids", [rng.randrange(32000) for _ in range(n)]),
                             ("text", "".join(rng.choice("abcde ") for _ in range(n)))):
            raw = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 128, "stream": True,
                              "stream_options": {"include_usage": True}}).encode()
            fast, full = _paths(raw)
            row = dict(prompt=kind, tokens=n, body_bytes=len(raw),
                       fast_us=round(_per_call_us(fast, args.repeats), 1),
                       full_us=round(_per_call_us(full, args.repeats), 1))
            row["full_over_fast"] = round(row["full_us"] / row["fast_us"], 2)
            rows.append(row)
            print(json.dumps(row))
    # the burst's 64 prompts, 16..1 024 ids, interpolated between the measured sizes
    ids = sorted((r["tokens"], r["fast_us"], r["full_us"]) for r in rows if r["prompt"] == "ids")

    def at(n, i):
        lo = max((t for t in ids if t[0] <= n), default=ids[0])
        hi = min((t for t in ids if t[0] >= n), default=ids[-1])
        if hi[0] == lo[0]:
            return lo[i]
        return lo[i] + (hi[i] - lo[i]) * (n - lo[0]) / (hi[0] - lo[0])
    lengths = [len(p) for p in token_prompts(64, 16, 1024, vocab=32000)]
    burst = {k: round(sum(at(n, i) for n in lengths) / 1e3, 2)
             for k, i in (("fast", 1), ("full", 2))}
    result = dict(rows=rows, burst_ms=burst, cpu=_cpu_name())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_parse.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"burst_ms": burst}))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
