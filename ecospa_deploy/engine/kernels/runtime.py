"""Triton availability for the engine's decode kernels, and the autotuner's timing function.

The kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (how the CPU test suite
checks them against the plain PyTorch path). Without Triton the engine falls back to PyTorch.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:          # pragma: no cover - depends on the installation
    triton = tl = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device, interpreter: bool = False) -> bool:
    """Whether the fused kernels can run on ``device`` here (``interpreter``: count the CPU
    interpreter, which only tests ask for: it is orders of magnitude slower)."""
    if triton is None:
        return False
    if interpreting():
        return interpreter and device.type == "cpu"
    return device.type == "cuda"


def tuning() -> bool:
    """Autotune block sizes (default). ``ECOSPA_TRITON_TUNE=0`` takes each kernel's first
    config: much faster start-up (tests), slower kernels."""
    return os.environ.get("ECOSPA_TRITON_TUNE", "1") != "0"


def quick_bench(fn, quantiles=None):
    """Autotuning timer: Triton's ``do_bench`` (cold L2, as in decode) over a short window.

    Decode shapes take microseconds; the default 25 ms warm-up + 100 ms window per config
    would make tuning a model's few dozen shapes take minutes.
    """
    return triton.testing.do_bench(fn, warmup=2, rep=8, quantiles=quantiles)
