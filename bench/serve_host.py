"""The HTTP side's own cost per streamed token: the server over a backend that costs nothing.

``python -m ecospa_deploy.bench.serve_host --out DIR`` runs ``ecospa serve``'s app (uvicorn with
our h11 protocol, the scheduler, detokenizing, SSE) in a child process over an instant backend
and the tiny tokenizer, streams ``--requests`` completions at once from this process, and writes
``serve_host[_TAG].json``: output tokens/s and the server's CPU milliseconds per 1 000 tokens.
That is what the server can stream at most, whatever the model: on a GPU the event loop's share
of it competes with the decode loop for the GIL at every step. ``--step-ms`` makes each step
take that long on an emulated device, launched ahead as the engine's are (``AsyncEchoBackend``;
the host waits with the GIL released, as on a CUDA event): the JSON then also has the
burst's ideal (every stream one token per step, nothing else) and the host's milliseconds per
step beyond it, the part of a served step a shorter (pruned) step cannot shrink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
from pathlib import Path


def _text_ids(tokenizer) -> list[int]:
    """Ids that decode to letters, so every streamed token carries text (and is counted)."""
    return [i for i in range(3, len(tokenizer)) if tokenizer.decode([i]).strip().isalpha()]


def _serve(sock: socket.socket, batch: int, gil_switch_ms: float,
           step_ms: float | None = None, waits_all: bool = False) -> None:
    import uvicorn

    from ecospa_deploy.serve import gc_heap
    from ecospa_deploy.serve.connections import guarded_h11
    from ecospa_deploy.serve.echo import AsyncEchoBackend, EchoBackend, echo_app
    from ecospa_deploy.testing import tiny_tokenizer

    sys.setswitchinterval(gil_switch_ms / 1e3)     # as ecospa serve does
    tokenizer = tiny_tokenizer()
    ids = _text_ids(tokenizer)
    backend = EchoBackend(None, ids) if step_ms is None else \
        AsyncEchoBackend(step_ms / 1e3, ids, waits_all=waits_all)
    app, _, _ = echo_app(tokenizer, backend, batch=batch,
                         max_queue=4 * batch, max_model_len=4096, timeout=600)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            http=guarded_h11(30.0, 1000))
    # as `ecospa serve` does once its app is built; unfrozen, a full collection landed on the
    # third burst of every run here, 0.6-0.7x the others' tokens/s
    gc_heap.settle()
    uvicorn.Server(config).run(sockets=[sock])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_share(tokens_per_s: float, streams: int, step_ms: float) -> dict:
    """The burst's ideal tokens/s at ``step_ms`` a step (``streams`` tokens a step), the share
    of it served, and the host's milliseconds per step beyond the step itself."""
    served_step_ms = 1e3 * streams / tokens_per_s
    return dict(ideal_output_tokens_per_s=round(1e3 * streams / step_ms, 1),
                of_ideal=round(step_ms / served_step_ms, 3),
                host_ms_per_step=round(served_step_ms - step_ms, 3))


def main(argv=None) -> int:
    from ecospa_deploy.benchmark.host import host_facts
    from ecospa_deploy.serve.loadtest import run_stream_load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gil-switch-ms", type=float, default=0.5)
    ap.add_argument("--step-ms", type=float, default=None,
                    help="each decode step takes this long on an emulated device, launched "
                    "ahead as the engine's are (default: steps cost nothing)")
    ap.add_argument("--collect-waits-all", action="store_true",
                    help="with --step-ms: collecting a step waits for the step launched ahead "
                    "too, as the engine did before its host-to-device copies were staged")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ctx = multiprocessing.get_context("spawn")
    host = host_facts()          # before the server starts: the probe on an idle core
    proc = ctx.Process(target=_serve,
                       args=(sock, args.requests, args.gil_switch_ms, args.step_ms,
                             args.collect_waits_all), daemon=True)
    proc.start()
    prompts = [[5 + i % 7] * 8 for i in range(args.requests)]
    runs = []
    try:
        asyncio.run(run_stream_load(url, prompts[:4], [4]))     # warm-up (waits for start)
        for _ in range(args.repeats):
            cpu0 = _cpu_s(proc.pid)
            run = asyncio.run(run_stream_load(url, prompts, [args.max_tokens]))
            cpu = _cpu_s(proc.pid) - cpu0
            tokens = sum(r.get("completion_tokens", 0) for r in run.pop("results"))
            runs.append(dict(output_tokens=tokens, wall_s=run["wall_s"],
                             output_tokens_per_s=run["output_tokens_per_s"],
                             server_cpu_ms_per_1k_tokens=round(1e6 * cpu / max(tokens, 1), 1),
                             ttft_mean_ms=run["ttft_mean_ms"],
                             server_ttft_mean_ms=run["server_ttft_mean_ms"]))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        proc.terminate()
        proc.join(10)
    def median(key):
        return sorted(r[key] for r in runs)[len(runs) // 2]

    # over an instant backend the client's TTFT less the scheduler's is the HTTP side's share
    result = dict(requests=args.requests, max_tokens=args.max_tokens,
                  gil_switch_ms=args.gil_switch_ms, cpus=os.cpu_count(), host=host,
                  median_output_tokens_per_s=median("output_tokens_per_s"),
                  median_server_cpu_ms_per_1k_tokens=median("server_cpu_ms_per_1k_tokens"),
                  median_ttft_mean_ms=median("ttft_mean_ms"),
                  median_server_ttft_mean_ms=median("server_ttft_mean_ms"), runs=runs)
    if args.step_ms is not None:
        result.update(step_ms=args.step_ms, collect_waits_all=args.collect_waits_all,
                      **step_share(result["median_output_tokens_per_s"], args.requests,
                                   args.step_ms))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_host{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
