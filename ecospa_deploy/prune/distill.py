"""Recovery by distillation from the dense model: the default recovery after pruning.

Fine-tuning a pruned model on the LM loss of a few calibration windows teaches it those windows
(the recovery text is small and narrow); matching the dense model's full next-token
distribution (KL on the logits, Hinton et al.; the recovery of Sheared-LLaMA, Minitron and
others) gives every position the teacher's ~50 k-way soft target instead of one token, so the
pruned model relearns what it *lost* rather than the calibration text. Optionally the last
hidden state is matched too (mean squared error, normalised by the teacher's mean square).

``distill`` runs AdamW with a linear warm-up and cosine decay over ``steps`` batches drawn in a
seeded order from ``windows``; on CUDA the forward passes run under bf16 autocast with fp32
master weights. ``on_step(step, model, optimizer)`` is called after each optimizer step with the
gradients still set: ``EcoSpaSparsifier`` is such a callback, which turns this loop into EcoSpa's
training-time recipe (Algorithm 1: prune while distilling, the optimizer moments sliced with the
weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ecospa_deploy.errors import EcospaError


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 2e-4
    batch_size: int = 8
    warmup: float = 0.05          # fraction of the steps
    min_lr: float = 0.1           # final lr as a fraction of ``lr``
    temperature: float = 1.0
    hidden_weight: float = 0.0    # weight of the last-hidden-state loss (0: logits only)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> "DistillConfig":
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise EcospaError(f"distill {name}={value!r} is invalid; expected an integer >= 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise EcospaError(f"distill lr={self.lr}, temperature={self.temperature}; expected > 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr <= 1 or self.hidden_weight < 0:
            raise EcospaError(f"distill warmup={self.warmup}, min_lr={self.min_lr}, hidden_weight="
                              f"{self.hidden_weight}; expected warmup in [0, 1), min_lr in "
                              "[0, 1], hidden_weight >= 0")
        return self


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr·lr`` at the last step."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """``KL(teacher ‖ student)`` per token, averaged over tokens (fp32), scaled by ``T²``."""
    t = temperature
    s = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
            cfg: DistillConfig | None = None, progress: bool = True,
            on_step: Callable[[int, nn.Module, torch.optim.Optimizer], object] | None = None
            ) -> list[float]:
    """Train ``student`` in place to match ``teacher`` on ``windows``; the per-step losses."""
    cfg = (cfg or DistillConfig()).validate()
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise EcospaError(f"distill windows of shape {tuple(windows.shape)}; expected "
                          "[samples, seq_len] token ids")
    device = next(student.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    teacher_was, student_was = teacher.training, student.training
    teacher.eval()
    frozen = [(p, p.requires_grad) for p in teacher.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(windows.shape[0], generator=gen)
                       for _ in range(math.ceil(cfg.steps * cfg.batch_size / windows.shape[0]))])
    losses = []
    want_hidden = cfg.hidden_weight > 0
    try:
        for step in tqdm(range(cfg.steps), desc="distill", disable=not progress):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = windows[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)
            with torch.no_grad(), autocast:
                t_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
            with autocast:
                s_out = student(input_ids=batch, use_cache=False,
                                output_hidden_states=want_hidden)
            loss = kl_loss(s_out.logits, t_out.logits, cfg.temperature)
            if want_hidden:
                th, sh = t_out.hidden_states[-1].float(), s_out.hidden_states[-1].float()
                loss = loss + cfg.hidden_weight * (sh - th).pow(2).mean() / th.pow(2).mean()
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            if on_step is not None:
                on_step(step + 1, student, opt)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        teacher.train(teacher_was)
        student.train(student_was)
    return losses


__all__ = ["DistillConfig", "distill", "kl_loss", "lr_at"]
