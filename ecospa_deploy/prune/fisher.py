"""Empirical Fisher information (squared gradients) of every decoder-layer parameter (Eq. 8).

``FisherAccumulator`` sums ``grad²`` after each backward pass, per decoder layer and parameter
name; ``mean()`` divides by the number of batches (the ``1/|D|`` of Eq. 8). It serves both the
one-shot pruner (gradients of the LM loss on calibration windows) and the training-time
sparsifier (the training step's own gradients, no extra pass).

On a GPU, ``calibration_fisher`` pads FFN widths to a multiple of 8 for the pass: an FFN width
such as LLaMA-1B's 5461 (or any width a pruning round leaves) makes every FFN GEMM's leading
dimension misaligned, and cuBLAS then falls back to align-1 kernels that ran the 1B pass at a
third of the 7B pass's tokens/s. The padded neurons are exact zeros (their gradients are zero
too), and the model and the sums are sliced back afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from ecospa_deploy.prune.calibration import backward_passes
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import pad_model, slice_model


class FisherAccumulator:
    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.sums: list[dict[str, torch.Tensor]] = [
            {} for _ in range(len(self.model.decoder_layers))]
        self.count = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the squared gradients now held by the layers' parameters (call after backward)."""
        seen = False
        for i, layer in enumerate(self.model.decoder_layers):
            sums = self.sums[i]
            for name, p in layer.named_parameters():
                if p.grad is None:
                    continue
                seen = True
                g = p.grad.detach()
                if name not in sums or sums[name].shape != g.shape:
                    sums[name] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
                sums[name].addcmul_(g, g)   # fp32 sum of grad², no temporary
        self.count += int(seen)

    def crop(self) -> None:
        """Cut every sum to its parameter's shape: the leading corner, where padding appended
        zeros at the end of an axis (FFN neurons)."""
        for i, layer in enumerate(self.model.decoder_layers):
            sums = self.sums[i]
            for name, p in layer.named_parameters():
                s = sums.get(name)
                if s is not None and s.shape != p.shape:
                    if s.dim() != p.dim() or any(a < b for a, b in zip(s.shape, p.shape)):
                        raise ValueError(f"layer {i} {name}: sums {tuple(s.shape)} do not "
                                         f"cover the parameter {tuple(p.shape)}")
                    sums[name] = s[tuple(slice(0, n) for n in p.shape)].contiguous()

    def mean(self, i: int) -> dict[str, torch.Tensor]:
        layer = self.model.decoder_layers[i]
        n = max(self.count, 1)
        out = {}
        for name, p in layer.named_parameters():
            s = self.sums[i].get(name)
            ok = s is not None and s.shape == p.shape
            out[name] = s / n if ok else torch.zeros_like(p, dtype=torch.float32)
        return out


def calibration_fisher(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                       desc: str = "fisher", show: bool = False, align: int | None = None
                       ) -> FisherAccumulator:
    """Squared gradients of the LM loss over ``windows`` (the model's weights are not changed).

    Only decoder-layer parameters get gradients (embeddings and the LM head are never scored,
    so their gradients would cost memory and time for nothing); the sums stay on the model's
    device, in fp32, whatever the compute dtype. ``batch_size`` windows go through each pass.
    ``align`` pads FFN widths to that multiple for the pass (default: 8 on CUDA, none on CPU).
    """
    device = next(model.parameters()).device
    if align is None:
        align = 8 if device.type == "cuda" else 0
    spec = model.config.ecospa_spec
    widths = [layer.intermediate_size for layer in spec.layers]
    if not align or all(w % align == 0 for w in widths):
        return _fisher(model, windows, batch_size, desc, show)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    pad_model(model, ffn_multiple=align)
    try:
        acc = _fisher(model, windows, batch_size, desc, show)
    finally:
        slice_model(model, [LayerMask(ffn=range(w)) if w % align else None for w in widths])
        model.config.set_spec(spec)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    acc.crop()
    return acc


def _fisher(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str, show: bool
            ) -> FisherAccumulator:
    acc = FisherAccumulator(model)
    params = [p for layer in model.decoder_layers for p in layer.parameters()]
    for _ in backward_passes(model, windows, batch_size, params, desc, show):
        acc.accumulate()
    return acc


__all__ = ["FisherAccumulator", "calibration_fisher"]
