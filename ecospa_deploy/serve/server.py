"""Start a server: load the model (or refuse with the loader's message), pick the backend,
bind the socket, print the URL and a curl example, run uvicorn, shut down on SIGTERM.

The socket is bound before the model loads, so a port already in use fails at once, and
``--port 0`` lets the OS choose a free port (the printed URL shows which).

Shutdown: SIGTERM stops accepting and lets running requests finish for ``--shutdown-timeout``
seconds; whatever still runs then is ended with a 503 (an error event and ``[DONE]`` for
streams), and the process exits with code 1 so supervisors see the cut-off.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ecospa_deploy import dtypes
from ecospa_deploy.serve import gc_heap
from ecospa_deploy.errors import UsageError

log = logging.getLogger("ecospa_deploy.serve")

DEFAULT_MAX_MODEL_LEN = 4096
EXIT_CUT_OFF = 1  # exit code when --shutdown-timeout ended requests that were still running
# uvicorn's own graceful-shutdown deadline, after ours: only a stuck response reaches it.
_UVICORN_GRACE = 5.0


@dataclass
class ServeOptions:
    path: str
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_batch_size: int = 8
    max_model_len: int | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    max_queue: int = 256
    prefill_chunk: int | None = None     # None: 512 prompt tokens per step on CPU, 8192 on CUDA
    decode_steps: int = 1
    async_decode: bool = True            # launch the next decode step before streaming this one
    compile: bool = True                 # torch.compile the engine's decode step (CUDA only)
    packed_prefill: bool = True          # prompts prefilled together run packed (engine)
    compile_prefill: bool = True         # torch.compile the packed prefill too (CUDA only)
    prefill_order: str = "shortest"      # waiting prompts: shortest first, or by arrival
    gil_switch_ms: float = 0.5           # sys.setswitchinterval while serving (Python's: 5 ms)
    engine_process: bool = False         # the engine core in its own process (serve/core.py)
    shutdown_timeout: float = 30.0
    read_timeout: float = 30.0
    max_connections: int | None = None
    log_level: str = "info"
    vllm_args: str | None = None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as "localhost"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def resolve_api_key(flag: str | None, environ=os.environ) -> str | None:
    """``--api-key``, else ``$ECOSPA_API_KEY``, else None (no auth). An empty or blank key is
    an error, not a silent "no auth": unset the variable to serve without a key."""
    source, key = ("--api-key", flag) if flag is not None else \
        ("ECOSPA_API_KEY", environ.get("ECOSPA_API_KEY"))
    if key is not None and not key.strip():
        raise UsageError(f"{source} is {key!r}; expected a non-empty key (leave {source} unset "
                         "to serve without authentication)")
    if key is not None and key != key.strip():
        raise UsageError(f"{source} has leading or trailing whitespace ({key!r}); HTTP clients "
                         "strip it from the Authorization header, so no client could match it. "
                         "Expected the key without surrounding spaces")
    return key


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_max_connections() -> int:
    """1000, or fewer when the file-descriptor limit leaves less room (model files, logs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(8, min(1000, soft - 64))


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def resolve_device_dtype(device: str, dtype: str):
    """``auto`` device = CUDA when available else CPU; ``auto`` dtype = bf16 on CUDA, fp32 on CPU."""
    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in dtypes.NAMES:
        raise UsageError(f"--dtype {dtype!r}; expected auto or one of {', '.join(dtypes.NAMES)}")
    return dev, dtypes.to_torch(dtype)


def _ids_of(*values) -> tuple[int, ...]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def _model_eos_ids(model) -> tuple[int, ...]:
    return _ids_of(getattr(model.generation_config, "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None))


def _eos_ids(model_ids: tuple[int, ...], tokenizer) -> tuple[int, ...]:
    return _ids_of(model_ids, tokenizer.eos_token_id)


def step_tokens(prefill_chunk: int | None, device) -> int:
    """Prompt tokens per scheduler step: ``--prefill-chunk``, else 8192 on CUDA and 512 on CPU;
    0 means whole prompts. On CUDA 8192 (vLLM's budget on large GPUs) against 2048: the
    64-prompt burst in 5 packed prefills instead of 19, 1.12x / 1.08x the output tokens/s of
    the dense / pruned twin over HTTP, TTFT p99 0.75x / 0.79x (H100,
    bench/results/serve_h200/RUNS.md, run 9)."""
    if prefill_chunk is not None:
        return prefill_chunk
    return 8192 if device.type == "cuda" else 512


def _max_model_len(model, requested: int | None) -> int:
    from ecospa_deploy.families import family_of_model

    family = family_of_model(model)
    limit = family.max_positions(model.config)
    if requested is None:
        return min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    if requested < 2:
        raise UsageError(f"--max-model-len {requested}; expected at least 2")
    if limit and requested > limit and family.positions == "learned":
        raise UsageError(f"--max-model-len {requested} exceeds the model's {limit} learned "
                         "positions")
    return requested


def build_backend(name: str, model, max_batch_size: int, max_seq_len: int, device, dtype,
                  step_tokens: int | None = None, compile: bool = True,
                  packed_prefill: bool = True, compile_prefill: bool = True):
    """``step_tokens``: the scheduler's prompt tokens per step; the engine's prefill batches stay
    within it, so warm-up captures several-row graphs only for widths a step can reach.
    ``compile``: on CUDA, the decode step of batches above 1 goes through ``torch.compile``
    (Inductor fuses the ~120 small elementwise kernels of an eager step); Dynamo makes the batch
    and KV-length ints symbolic after the second shape it sees, so the warm-up compiles a few
    graphs, not one per bucket, and then captures every bucket from them. Never on CPU, where
    compiling costs more than a CPU server's whole run. ``packed_prefill``: prompts prefilled
    together run end to end with no padding rows where the engine can (``engine/varlen.py``);
    False keeps padded rows (the A/B). ``compile_prefill`` (with ``compile``): the packed
    prefill through ``torch.compile`` as well, before its graphs are captured (run 10: the
    8192-token prefill 1.5-1.6x faster, the burst +11-12 % tokens/s)."""
    if name == "engine":
        import torch

        from ecospa_deploy.engine import Engine

        extra = {"max_prefill_tokens": step_tokens} if step_tokens else {}
        engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        device=device, dtype=dtype,
                        compile=bool(compile) and torch.device(device).type == "cuda",
                        compile_prefill=bool(compile_prefill),
                        packed_prefill=None if packed_prefill else False, **extra)
        # Capture every prefill batch (rows x prompt-length bucket) and every decode shape
        # now, so no request pays a capture or an autotune (CUDA only).
        engine.warmup(engine.prefill_row_counts, decode=True, progress=warmup_progress())
        return engine
    from ecospa_deploy.serve.hf_backend import HFBackend

    return HFBackend(model.to(device=device, dtype=dtype), max_batch_size, max_seq_len)


def warmup_progress(every_s: float = 10.0, clock=time.monotonic):
    """``Engine.warmup``'s ``progress``: a log line at the first graph, at most every
    ``every_s`` after it and at the last, with the time so far. A compiled warm-up of a pruned
    model takes minutes (every layer's own shapes get their own kernels), and a start that
    prints nothing that long looks hung."""
    t0 = last = clock()

    def report(done: int, total: int, what: str) -> None:
        nonlocal last
        now = clock()
        if done in (1, total) or now - last >= every_s:
            last = now
            log.info("warm-up: %d/%d graphs, %.1f s (%s)", done, total, now - t0, what)

    return report


def _run_vllm(opts: ServeOptions, name: str) -> int | None:
    """Serve through vLLM (ecospa_deploy.serve.vllm_backend); None when ``--backend auto`` should
    fall back because vLLM cannot serve the model here (logged in one line)."""
    import dataclasses

    from ecospa_deploy.serve import vllm_backend

    if opts.port == 0:  # vLLM binds by itself: pick the free port here
        probe = _bind(opts.host, 0)
        opts = dataclasses.replace(opts, port=probe.getsockname()[1])
        probe.close()
    try:
        proc = vllm_backend.start(opts, name, _url(opts.host, opts.port))
    except vllm_backend.VLLMStartError as exc:
        if opts.backend == "auto":
            log.warning("auto: vllm cannot serve this model, falling back: %s", exc)
            return None
        raise UsageError(f"--backend vllm: {exc}") from None
    print_banner(_url(opts.host, opts.port), name, "vllm", opts.api_key)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return vllm_backend.relay(proc)
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def print_banner(url: str, name: str, backend: str, api_key: str | None) -> None:
    auth = ' -H "Authorization: Bearer $ECOSPA_API_KEY"' if api_key else ""
    print(f"ecospa-serve: serving {name!r} with the {backend} backend at {url}/v1\n"
          f"  try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{name}\", \"prompt\": \"To be, or not to be\", "
          f"\"max_tokens\": 32}}'\n"
          f"  health: {url}/health   metrics: {url}/metrics", flush=True)


def serve(opts: ServeOptions) -> int:
    """Blocking: serve until SIGTERM/SIGINT; returns the exit code."""
    from ecospa_deploy.serve.backend import choose_backend, fallback_after_vllm

    logging.basicConfig(level=opts.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for what, value in (("--max-batch-size", opts.max_batch_size), ("--max-queue", opts.max_queue),
                        ("--max-body-bytes", opts.max_body_bytes)):
        if value < 1:
            raise UsageError(f"{what} {value}; expected a positive integer")
    for what, value in (("--request-timeout", opts.request_timeout),
                        ("--read-timeout", opts.read_timeout)):
        if not value > 0:
            raise UsageError(f"{what} {value}; expected seconds > 0")
    if not opts.shutdown_timeout >= 0:
        raise UsageError(f"--shutdown-timeout {opts.shutdown_timeout}; expected seconds >= 0")
    if opts.prefill_chunk is not None and opts.prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk {opts.prefill_chunk}; expected tokens >= 1, or 0 "
                         "to prefill whole prompts")
    if opts.decode_steps < 1:
        raise UsageError(f"--decode-steps {opts.decode_steps}; expected an integer >= 1")
    if not opts.gil_switch_ms > 0:
        raise UsageError(f"--gil-switch-ms {opts.gil_switch_ms}; expected milliseconds > 0")
    if opts.max_connections is not None and opts.max_connections < 1:
        raise UsageError(f"--max-connections {opts.max_connections}; expected a positive integer")
    opts.api_key = resolve_api_key(opts.api_key)
    if opts.api_key is None and not is_loopback(opts.host):
        log.warning("serving on %s without an API key: anyone who can reach this address can "
                    "use the model; set --api-key or ECOSPA_API_KEY", opts.host)
    from ecospa_deploy.commands.args import require_model

    require_model("model", opts.path)           # before torch loads (and before the backend)
    name = opts.served_model_name or Path(opts.path).resolve().name
    choice = choose_backend(opts.backend)
    log.info("backend %s (%s)", choice.name, choice.reason)
    if choice.name == "vllm":
        code = _run_vllm(opts, name)
        if code is not None:
            return code
        choice = fallback_after_vllm()
        log.info("backend %s (%s)", choice.name, choice.reason)

    # A SIGTERM before uvicorn takes over (model loading) exits cleanly too; uvicorn restores
    # this handler and re-raises the signal once it has shut down gracefully.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    sock = _bind(opts.host, opts.port)
    try:
        return _serve_socket(opts, name, choice.name, sock)
    finally:
        sock.close()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def _draining_server(uvicorn, config, scheduler, drain_timeout: float):
    """uvicorn's server, but at ``drain_timeout`` after shutdown begins the scheduler ends all
    running work with "the server is shutting down" (503s that reach their clients) instead
    of uvicorn cancelling the request tasks (plain 500s, streams cut mid-event)."""

    class DrainingServer(uvicorn.Server):
        cut_off = 0

        async def shutdown(self, sockets=None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(drain_timeout, self._cut_off)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        def _cut_off(self) -> None:
            self.cut_off = scheduler.busy
            if self.cut_off:
                log.error("--shutdown-timeout %g s reached: ending %d running sequences with "
                          "503", drain_timeout, self.cut_off)
            scheduler.abort()

    return DrainingServer(config)


def start_scheduler(config, make_scheduler):
    """Load the model of ``config`` (a ``serve.core.CoreConfig``), build its backend and start
    ``make_scheduler(backend, max_batch_size, max_queue, **knobs)``; returns (scheduler, info:
    what the HTTP side needs of the model). The one path of both layouts: in this process, and
    inside the engine core."""
    from ecospa_deploy.loading import load_model

    device, dtype = resolve_device_dtype(config.device, config.dtype)
    model = load_model(config.path, dtype=dtype)
    max_len = _max_model_len(model, config.max_model_len)
    chunk = step_tokens(config.prefill_chunk, device)
    backend = build_backend(config.backend, model, config.max_batch_size, max_len, device, dtype,
                            step_tokens=chunk or None, compile=config.compile,
                            packed_prefill=config.packed_prefill,
                            compile_prefill=config.compile_prefill)
    scheduler = make_scheduler(backend, config.max_batch_size, config.max_queue,
                               prefill_chunk=chunk or None,
                               max_pause=None if device.type == "cuda" else 0.25,
                               decode_steps=config.decode_steps,
                               async_decode=config.async_decode,
                               prefill_order=config.prefill_order).start()
    return scheduler, {"max_model_len": max_len, "vocab_size": model.config.vocab_size,
                       "eos_token_ids": _model_eos_ids(model), "device": str(device),
                       "dtype": dtypes.name_of(dtype)}


def _core_config(opts: ServeOptions, backend_name: str):
    from ecospa_deploy.serve.core import CoreConfig

    return CoreConfig(
        path=opts.path, backend=backend_name, device=opts.device, dtype=opts.dtype,
        max_batch_size=opts.max_batch_size, max_model_len=opts.max_model_len,
        max_queue=opts.max_queue, prefill_chunk=opts.prefill_chunk,
        decode_steps=opts.decode_steps, async_decode=opts.async_decode, compile=opts.compile,
        packed_prefill=opts.packed_prefill, compile_prefill=opts.compile_prefill,
        prefill_order=opts.prefill_order,
        gil_switch_ms=opts.gil_switch_ms, log_level=opts.log_level)


def _start(opts: ServeOptions, backend_name: str, metrics):
    """(scheduler, info): the engine in this process, or in an engine-core process
    (``--engine-process``, ``serve/core.py``)."""
    config = _core_config(opts, backend_name)
    if opts.engine_process:
        from ecospa_deploy.serve.core import EngineCoreClient

        client = EngineCoreClient(config, metrics).start()
        return client, client.info
    from ecospa_deploy.serve.scheduler import Scheduler

    return start_scheduler(config, functools.partial(Scheduler, metrics=metrics))


def _serve_socket(opts: ServeOptions, name: str, backend_name: str, sock: socket.socket) -> int:
    import uvicorn

    from ecospa_deploy.loading import load_tokenizer
    from ecospa_deploy.serve.app import create_app
    from ecospa_deploy.serve.connections import guarded_h11
    from ecospa_deploy.serve.generation import GenerationService
    from ecospa_deploy.serve.metrics import Metrics

    metrics = Metrics()
    # Loader errors propagate: the server refuses to start with the loader's message.
    scheduler, info = _start(opts, backend_name, metrics)
    try:
        tokenizer = load_tokenizer(opts.path)
    except BaseException:
        scheduler.stop()
        raise
    # The decode loop and the HTTP side (event loop: SSE, detokenizing) share a GIL when they
    # share a process; a thread that wants it back waits until the holder is asked to drop
    # it, after Python's switch interval. At 5 ms that wait lands on every decode step while
    # streams are being written (a step is 2-4 ms on the GPU).
    sys.setswitchinterval(opts.gil_switch_ms / 1e3)
    max_len, device = info["max_model_len"], info["device"]
    service = GenerationService(scheduler, tokenizer, name, max_len,
                                vocab_size=info["vocab_size"],
                                eos_token_ids=_eos_ids(info["eos_token_ids"], tokenizer),
                                request_timeout=opts.request_timeout)
    app = create_app(service, metrics, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes,
                     backend_name=backend_name)
    gc_heap.settle()    # the model and its compiled graphs too, when the engine runs here
    max_connections = opts.max_connections or default_max_connections()
    host, port = sock.getsockname()[:2]
    log.info("model %s on %s (%s), max_model_len %d, max_batch_size %d, GIL switch %g ms, "
             "engine %s", opts.path, device, info["dtype"], max_len, opts.max_batch_size,
             sys.getswitchinterval() * 1e3,
             "in its own process" if opts.engine_process else "in this process")
    print_banner(_url(opts.host, port), name, backend_name, opts.api_key)
    config = uvicorn.Config(app, log_level=opts.log_level, access_log=False,
                            timeout_graceful_shutdown=opts.shutdown_timeout + _UVICORN_GRACE,
                            http=guarded_h11(opts.read_timeout, max_connections),
                            lifespan="off")
    server = _draining_server(uvicorn, config, scheduler, opts.shutdown_timeout)
    # uvicorn re-raises the SIGTERM it caught once shut down; the exit code says whether
    # running work had to be cut off.
    signal.signal(signal.SIGTERM,
                  lambda *_: sys.exit(EXIT_CUT_OFF if server.cut_off else 0))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        service.close()
        gc_heap.report()
        if server.cut_off:
            log.error("shut down after cutting off %d sequences at --shutdown-timeout",
                      server.cut_off)
        else:
            log.info("shut down cleanly")
    return EXIT_CUT_OFF if server.cut_off else 0
