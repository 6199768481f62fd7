"""Host-to-device copies that do not wait for the GPU.

A copy from ordinary (pageable) host memory to CUDA returns only once the stream is idle: ATen
synchronizes the stream after every blocking copy. So a small copy issued while a decode step
is queued ahead (async decode: step N+1 launched before step N's tokens are read) waits for that
step, and the host can no longer prepare the next step while the GPU runs this one: the engine
parked its idle rows this way on every decode step once any stream had finished. Staged in
pinned memory and copied with ``non_blocking``, the copy is queued behind the work already
launched and the host goes on; PyTorch's pinned-memory allocator keeps the staging block until
the copy has run, so it may be dropped at once. Off CUDA, plain copies.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(values: torch.Tensor | Sequence[int], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (a host tensor, or ints as ``dtype``) on ``device``, queued, not waited for."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or host.is_cuda:
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_in(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, queued, not waited for, where ``dst`` is on CUDA and ``src`` on the
    host (a graph's static input buffer filled before its replay)."""
    if dst.is_cuda and not src.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


__all__ = ["copy_in", "to_device"]
