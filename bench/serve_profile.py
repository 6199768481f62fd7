"""Where the server's time goes under the streamed burst: a host-side timeline by py-spy.

``python -m ecospa_deploy.bench.serve_profile --shape llama-1b --out DIR`` (needs ``py-spy``)
serves the shape's twin (random weights, a word-level tokenizer: one event per token), fires
the burst of ``bench/serve_gpu.py`` twice (the second measured) while py-spy samples every
thread of the server process, and writes ``serve_profile_<shape>_<model>.json``: samples per
thread and category (the model's decode step and prefill, the scheduler's per-token fan-out,
detokenizing, SSE/JSON encoding, HTTP, the event loop, idle), their share of the burst's wall
time, and milliseconds per decode step. ``--shape`` also takes a JSON path (CPU: a tiny shape
from ``ecospa_deploy.testing.tiny_shape``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

# (category, pattern on "function (file:line)" frames), first match from the leaf up wins
CATEGORIES = (
    ("model: decode step", r"\b(step|_run_decode|replay|decode) \(.*engine/(engine|forward|fused)"),
    ("model: prefill", r"\b(add|add_chunk|_prefill_rows|_run_prefill|prefill) \(.*engine/"),
    ("scheduler: per-token fan-out", r"\b(_emit|sink|call_soon_threadsafe) \("),
    ("detokenize", r"detokenize\.py"),
    ("SSE/JSON encoding", r"\b(dumps|encode|_chunk|_sse\w*) \(|json/encoder"),
    ("HTTP (uvicorn/h11/starlette)", r"uvicorn|h11|starlette|fastapi"),
    ("event loop (asyncio)", r"asyncio"),
)


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):            # leaf first
        for name, pattern in CATEGORIES:
            if re.search(pattern, frame):
                return name
    return "other"


def aggregate(raw: str) -> dict[str, dict[str, int]]:
    """py-spy ``--format raw`` lines (``thread;frame;...;frame count``) -> samples per
    thread kind and category."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        kind = ("scheduler" if "ecospa-scheduler" in thread or any("scheduler.py" in f and
                                                                      "_run" in f for f in frames)
                else "event loop" if any("uvicorn" in f or "asyncio" in f for f in frames)
                else "other threads")
        idle = any(re.search(r"\b(wait|select|poll|epoll|_wait_for_tstate_lock) \(", f)
                   for f in frames[-2:])
        out[kind]["idle (waiting)" if idle else categorize(frames[1:])] += int(count)
    return {k: dict(v.most_common()) for k, v in out.items()}


def main(argv=None) -> int:
    from ecospa_deploy.serve.loadtest import run_stream_load, token_prompts
    from ecospa_deploy.serve.process import ServerProcess

    from .serve_gpu import word_tokenizer
    from ecospa_deploy.benchmark.shapes import build_model, load_shape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--pruned", action="store_true", help="profile the pruned twin")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-lens", default="16:1024")
    ap.add_argument("--max-tokens-mix", default="32,64,128")
    ap.add_argument("--max-model-len", type=int, default=1280)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--server-args", default="", help="more ecospa serve flags, one string "
                    "after '=' (--server-args=\"--engine-process\"; a lone flag after a "
                    "space is read as this command's own option)")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    shape = load_shape(args.shape)
    vocab = shape["dense"]["vocab_size"]
    lo, hi = (int(x) for x in args.prompt_lens.split(":"))
    mix = [int(x) for x in args.max_tokens_mix.split(",")]
    prompts = token_prompts(args.requests, lo, hi, vocab)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    label = "pruned" if args.pruned else "dense"
    server_args = ["--backend", "engine", "--device", dev.type, "--dtype",
                   str(dtype).removeprefix("torch."), "--max-batch-size", str(args.requests),
                   "--max-model-len", str(args.max_model_len), "--max-queue",
                   str(4 * args.requests), *shlex.split(args.server_args)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_profile_{Path(args.shape).stem}_{label}{args.tag}"
    raw_path = args.out / f"{stem}.raw.txt"
    with tempfile.TemporaryDirectory(prefix="ecospa-profile-") as tmp:
        build_model(shape, args.pruned, dtype, dev).save_pretrained(tmp)
        word_tokenizer(vocab).save_pretrained(tmp)
        with ServerProcess(tmp, *server_args, startup_timeout=600.0) as srv:
            asyncio.run(run_stream_load(srv.url, prompts[:4], [4]))
            asyncio.run(run_stream_load(srv.url, prompts, mix))              # first burst
            steps0 = _steps(srv.url)
            spy = subprocess.Popen(["py-spy", "record", "-p", str(srv.proc.pid), "--threads",
                                    "--idle", "--nonblocking", "--format", "raw", "-r",
                                    str(args.rate), "-o", str(raw_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)                                                  # attach
            t0 = time.perf_counter()
            run = asyncio.run(run_stream_load(srv.url, prompts, mix))
            wall = time.perf_counter() - t0
            spy.send_signal(signal.SIGINT)
            err = spy.communicate(timeout=60)[1]
            steps = _steps(srv.url) - steps0
    if not raw_path.exists():
        raise SystemExit(f"py-spy wrote nothing: {err[-500:]}")
    samples = aggregate(raw_path.read_text())
    period_ms = 1e3 / args.rate
    run.pop("results")
    result = {"shape": args.shape, "model": label, "device": dev.type, "wall_s": round(wall, 3),
              "decode_steps": steps, "ms_per_step": round(1e3 * wall / max(steps, 1), 3),
              "py_spy_rate": args.rate, "load": run, "threads": {}}
    for kind, cats in samples.items():
        result["threads"][kind] = {
            cat: {"samples": n, "ms_per_step": round(n * period_ms / max(steps, 1), 3)}
            for cat, n in cats.items()}
    out = args.out / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def _steps(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    match = re.search(r"^ecospa_batch_size_count (\S+)", text, re.M)
    return int(float(match.group(1))) if match else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
