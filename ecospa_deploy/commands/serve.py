"""OpenAI-compatible HTTP server for a (pruned) model.

Serves POST /v1/completions and /v1/chat/completions (streaming with "stream": true),
GET /v1/models, /health (no API key needed) and /metrics (Prometheus). Concurrent requests
are batched dynamically. Backends: engine (the ecospa engine), hf (plain transformers, the
reference), vllm (vLLM's own OpenAI server through the ecospa plugin); auto tries
vllm, then engine, then hf and logs why.

examples:
  ecospa-serve ./pruned-llama
  ecospa serve ./pruned-llama --port 8080 --api-key "$KEY" --max-batch-size 32
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "pruned-llama", "prompt": "To be, or not to be", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse

from ecospa_deploy import dtypes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecospa_deploy.commands.args import port
    from ecospa_deploy.serve.backend import BACKENDS
    from ecospa_deploy.serve.scheduler import MAX_PASSED_OVER, PREFILL_ORDERS
    from ecospa_deploy.serve.server import ServeOptions as D

    parser.add_argument("path", help="model directory (our format or a foreign HF directory) "
                        "with its tokenizer")
    parser.add_argument("--host", default=D.host, help="address to bind (default: %(default)s; "
                        "use 0.0.0.0 to accept remote clients)")
    parser.add_argument("--port", type=port, default=D.port,
                        help="port (default: %(default)s; 0 = any free port)")
    parser.add_argument("--backend", choices=BACKENDS, default=D.backend,
                        help="generation backend (default: %(default)s)")
    parser.add_argument("--dtype", default=D.dtype,
                        choices=["auto", *dtypes.NAMES],
                        help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=D.device,
                        help="auto, cpu, cuda or cuda:N (auto: CUDA when available)")
    parser.add_argument("--max-batch-size", type=int, default=D.max_batch_size,
                        help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + completion tokens per sequence (default: the model's "
                        "positions, at most 4096)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health, "
                        "/metrics included (default: $ECOSPA_API_KEY, else no key; an empty "
                        "key is an error)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the directory's name)")
    parser.add_argument("--max-body-bytes", type=int, default=D.max_body_bytes,
                        help="largest request body accepted (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=D.request_timeout,
                        help="seconds a request may take, queueing included (default: "
                        "%(default)s)")
    parser.add_argument("--max-queue", type=int, default=D.max_queue,
                        help="sequences that may wait for a slot before requests get HTTP 429 "
                        "(default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=D.prefill_chunk,
                        help="prompt tokens prefilled between two decode steps, so a long "
                        "prompt never pauses running streams for its whole prefill (engine "
                        "backend; default: 512 on CPU, 8192 on CUDA; 0 = whole prompts)")
    parser.add_argument("--decode-steps", type=int, default=D.decode_steps,
                        help="decode steps run per host sync while no request waits: the "
                        "host work of a step (sync, bookkeeping, streaming) is paid once per "
                        "that many tokens, which then arrive together (engine backend; "
                        "default: %(default)s)")
    parser.add_argument("--no-async-decode", dest="async_decode", action="store_false",
                        help="engine backend: launch each decode step only after the previous "
                        "step's tokens were handed to the streams (by default the next step "
                        "runs on the device meanwhile)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="engine backend on CUDA: do not torch.compile the decode step "
                        "(starts faster; each step of a batch above 1 then runs ~120 small "
                        "unfused kernels)")
    parser.add_argument("--no-packed-prefill", dest="packed_prefill", action="store_false",
                        help="engine backend: prefill prompts admitted together as rows padded "
                        "to the longest (by default they run packed end to end, no padding, "
                        "where the attention for it runs: CUDA in fp16/bf16, or the CPU)")
    parser.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction,
                        default=D.compile_prefill,
                        help="engine backend on CUDA: torch.compile the packed prefill as well "
                        "as the decode step (Inductor fuses its norms, RoPE and SiLU-mul: the "
                        "8192-token prefill ran 1.5-1.6x faster; two more compiles at start; "
                        "default: on; --no-compile or --no-compile-prefill turn it off)")
    parser.add_argument("--prefill-order", choices=PREFILL_ORDERS, default=D.prefill_order,
                        help="which waiting prompt is prefilled first: the shortest (a burst's "
                        "TTFTs are prefix sums of its prefills; a prompt passed over "
                        f"{MAX_PASSED_OVER} times goes first) or the first to arrive "
                        "(default: %(default)s)")
    parser.add_argument("--gil-switch-ms", type=float, default=D.gil_switch_ms,
                        help="Python's thread switch interval while serving: how long the "
                        "decode loop may wait for the GIL behind the HTTP side (default: "
                        "%(default)s; Python's own is 5)")
    parser.add_argument("--engine-process", action="store_true",
                        help="run the model and its decode loop in a process of their own "
                        "(the engine core), so the decode loop never waits for the GIL behind "
                        "HTTP, tokenizing and streaming (engine and hf backends)")
    parser.add_argument("--shutdown-timeout", type=float, default=D.shutdown_timeout,
                        help="seconds in-flight requests get to finish after SIGTERM; work "
                        "still running then ends with a 503 and the exit code is 1 "
                        "(default: %(default)s)")
    parser.add_argument("--read-timeout", type=float, default=D.read_timeout,
                        help="seconds a client has to send a whole request, headers and body "
                        "(else 408 and the connection is closed; default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections beyond which new ones get 503 (default: 1000, "
                        "or less under a low file-descriptor limit)")
    parser.add_argument("--vllm-args", default=None,
                        help="extra arguments for vLLM's server with --backend vllm, one "
                        "string (e.g. \"--enforce-eager --kv-cache-memory-bytes 67108864\")")
    parser.add_argument("--log-level", default=D.log_level,
                        choices=["debug", "info", "warning", "error"],
                        help="server log level (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ecospa_deploy.serve.server import ServeOptions, serve

    return serve(ServeOptions(**vars(args)))
