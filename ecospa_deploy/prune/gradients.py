"""Gradients of the LM loss on calibration windows, per decoder-layer parameter.

First-order Taylor scores (LLM-Pruner's ``|w·∂L/∂w|``) need the gradient itself, summed over
the calibration set *before* taking the magnitude; the empirical Fisher (``fisher.py``) sums
its square per batch instead, so the two cannot share one accumulator; they share the pass
(``calibration.backward_passes``): eval mode, only the asked decoder layers' parameters
require a gradient, fp32 sums on the model's device, flags and mode restored afterwards.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ecospa_deploy.prune.calibration import backward_passes


def loss_gradients(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                   layers: Sequence[int] | None = None, desc: str = "gradients",
                   show: bool = False) -> list[dict[str, torch.Tensor] | None]:
    """Per decoder layer, ``{parameter name: ∂L/∂w}`` (fp32) of the mean over batches of the
    batch's mean LM loss (the gradient of the mean loss when batches are equal); ``None`` for
    a layer not in ``layers`` (default: every layer)."""
    decoder = list(model.decoder_layers)
    wanted = set(range(len(decoder)) if layers is None else layers)
    sums: list[dict[str, torch.Tensor] | None] = [
        {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
         for name, p in layer.named_parameters()} if i in wanted else None
        for i, layer in enumerate(decoder)]
    count = 0
    params = [p for i in wanted for p in decoder[i].parameters()]
    for _ in backward_passes(model, windows, batch_size, params, desc, show):
        with torch.no_grad():
            for i in wanted:
                for name, p in decoder[i].named_parameters():
                    if p.grad is not None:
                        sums[i][name] += p.grad.float()
        count += 1
    for layer in sums:
        for g in (layer or {}).values():
            g /= max(count, 1)
    return sums


__all__ = ["loss_gradients"]
