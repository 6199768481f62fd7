"""Activation statistics of calibration data: what every activation-aware pruner reads.

Per decoder layer, for the inputs of three modules (``Family.stat_modules``): the attention
input (the normed hidden state entering q/k/v), the output projection's input (the concatenated
head outputs: one channel per v dim of each query head) and the down projection's input (the FFN
activations, one channel per neuron), the sums ``n``, ``Σx`` and ``XᵀX`` (float64 sums of
float32 products), plus the median squared norm of the residual stream leaving the layer.

Every score the methods use is a closed form of these: a channel's mean, second moment and
variance (FLAP's fluctuation), a unit's expected output energy ``E[h_j²]·‖W[:, j]‖²``
(Wanda-sp), the energy of a q/k dim ``w Σ wᵀ`` (``Σ`` the attention input's second moment),
and the least-squares compensation of Numerical Pruning (Eq. 11). The residual median is the
scale a layer's removals are measured against: the mean would be set by the few tokens that
carry massive activations (attention sinks), whose norm is hundreds of times the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ecospa_deploy.families import family_of_model
from ecospa_deploy.prune.calibration import batches

INPUTS = ("attn", "o", "down")


@dataclass
class Moments:
    """Running moments of one module input: token count, ``Σx`` and ``XᵀX`` (float64)."""

    n: int
    sum: torch.Tensor      # [D]
    gram: torch.Tensor     # [D, D]

    @classmethod
    def empty(cls, dim: int, device) -> "Moments":
        return cls(0, torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        self.sum += x.sum(0).double()
        self.gram += (x.t() @ x).double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def second(self) -> torch.Tensor:
        """``E[x xᵀ]``."""
        return self.gram / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        """``E[(x − μ)(x − μ)ᵀ]``."""
        mu = self.mean
        return self.second - torch.outer(mu, mu)

    @property
    def var(self) -> torch.Tensor:
        """Per-channel variance (FLAP's fluctuation of an input channel)."""
        return (self.gram.diagonal() / max(self.n, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def energy(self) -> torch.Tensor:
        """Per-channel ``E[x²]``."""
        return self.gram.diagonal() / max(self.n, 1)


@dataclass
class LayerStats:
    attn: Moments
    o: Moments
    down: Moments
    residual: float        # median over tokens of ‖h‖² of the layer's output hidden state

    def __getitem__(self, key: str) -> Moments:
        return getattr(self, key)


@torch.no_grad()
def collect(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
            desc: str = "activations", progress: bool = True) -> list[LayerStats]:
    """Moments of every layer's three module inputs over the calibration ``windows``."""
    family = family_of_model(model)
    device = next(model.parameters()).device
    layers = list(model.decoder_layers)
    moments: list[dict[str, Moments]] = [{} for _ in layers]
    norms: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        for key, module in family.stat_modules(layer).items():
            def hook(_m, args, _out, i=i, key=key):
                x = args[0]
                if key not in moments[i]:
                    moments[i][key] = Moments.empty(x.shape[-1], x.device)
                moments[i][key].add(x)
            hooks.append(module.register_forward_hook(hook))

        def out_hook(_m, _args, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            norms[i].append(h.detach().float().pow(2).sum(-1).flatten().cpu())
        hooks.append(layer.register_forward_hook(out_hook))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches(windows, batch_size)), desc=desc, leave=False,
                          disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [LayerStats(m["attn"], m["o"], m["down"], float(torch.cat(r).median()))
            for m, r in zip(moments, norms)]


__all__ = ["INPUTS", "Moments", "LayerStats", "collect"]
