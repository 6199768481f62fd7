"""A plain, reproducible causal-LM training loop and the model shapes the project trains.

Models are stock HF ``LlamaForCausalLM`` (GQA + RoPE) and ``GPT2LMHeadModel``; after training,
``ecospa_deploy.modeling.from_hf`` turns them into our per-layer-shaped classes with the same
weights. The loop also trains our classes directly, and takes step callbacks (e.g. a
sparsity schedule that slices weights and AdamW moments every N steps), which is how sparse
pre-training from scratch runs through the same code as dense training.

Reproducibility: one seed drives the initialisation and the batch sampler (a CPU
``torch.Generator``), so a run on the same device and library versions repeats exactly on
CPU; on CUDA, bf16 autocast and non-deterministic kernels make repeats agree to noise only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ecospa_deploy.evaluate import perplexity

StepCallback = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def build_model(family: str, shape: str, vocab_size: int, seed: int = 0,
                max_len: int = 1024) -> nn.Module:
    """A freshly initialised stock HF model (seeded, SDPA attention) of a family's named
    training shape (``Family.train_shapes``: "tiny" trains on 2 CPU cores in about a minute,
    "small" is the ~30 M parameter GPU model of the quality tables)."""
    from ecospa_deploy.families import get

    fam = get(family)
    if shape not in fam.train_shapes:
        raise ValueError(f"shape={shape!r}; expected one of {sorted(fam.train_shapes)}")
    config = fam.stock_config({**fam.train_defaults, **fam.train_shapes[shape],
                               "vocab_size": vocab_size, "max_position_embeddings": max_len})
    torch.manual_seed(seed)
    return fam.stock_class(fam.primary_stock)._from_config(config, attn_implementation="sdpa")


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding/head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False          # autocast on CUDA; the weights and optimizer stay fp32
    eval_every: int = 0         # 0: evaluate only at the end (when eval tokens are given)
    eval_windows: int = 64


@dataclass
class TrainResult:
    losses: list[float]
    eval: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens from one flat stream."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than one window "
                         f"(seq_len={seq_len})")
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and embeddings (1-D tensors and embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or ".wte" in name or ".wpe" in name
         else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                             fused=cfg.device.startswith("cuda"))


def _autocast(cfg: TrainConfig):
    if cfg.bf16 and cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(model: nn.Module, tokens: torch.Tensor, cfg: TrainConfig, *,
          eval_tokens: torch.Tensor | None = None,
          callbacks: Sequence[StepCallback] = (),
          optimizer: torch.optim.Optimizer | None = None,
          progress: bool = True, desc: str = "train") -> TrainResult:
    """Train ``model`` in place on random windows of ``tokens``; returns losses and throughput.

    ``callbacks`` run after every optimizer step as ``cb(step, model, optimizer)`` (1-based
    step); one may replace parameters (structured sparsification), so the loop never holds
    parameter references across steps. Throughput counts training tokens over the wall time of
    the steps, evaluations excluded.
    """
    if cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps}; expected >= 1")
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(cfg.device).train()
    opt = optimizer or make_optimizer(model, cfg)
    result = TrainResult(losses=[], config=asdict(cfg))
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = sample_batch(tokens, cfg.batch_size, cfg.seq_len + 1, gen).to(cfg.device)
        with _autocast(cfg):
            logits = model(input_ids=x[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for cb in callbacks:
            cb(step + 1, model, opt)
        value = loss.item()  # syncs, so the timing below is honest on CUDA
        result.seconds += time.perf_counter() - t0
        result.tokens += x[:, 1:].numel()
        result.losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        last = step + 1 == cfg.steps
        if eval_tokens is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            ppl = perplexity(model, eval_tokens, cfg.seq_len, cfg.batch_size, progress=False,
                             max_windows=cfg.eval_windows, bf16=cfg.bf16)
            result.eval.append({"step": step + 1, "perplexity": ppl.perplexity,
                                "seq_len": ppl.seq_len, "windows": ppl.windows})
            model.train()
    bar.close()
    model.eval()
    return result
