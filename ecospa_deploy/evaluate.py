"""Held-out perplexity with one stated protocol, used everywhere: ``ecospa eval``, the training
loop, the demo, the tests and the benchmarks (there is no second implementation).

Protocol (the fixed-window protocol of GPTQ/SparseGPT/Wanda/LLM-Pruner, stride = window):

1. The whole text is tokenized once with the model's tokenizer, no special tokens added.
2. It is cut into ``floor(N / seq_len)`` *non-overlapping* windows of ``seq_len`` tokens; the
   remainder (< ``seq_len`` tokens) is dropped. A text shorter than one window is an error.
3. Each window is scored independently (no context carried across windows): every token but the
   window's first is predicted, so each window contributes ``seq_len − 1`` predictions.
4. ``perplexity = exp(Σ NLL / Σ predictions)`` over all windows (token-weighted, fp32 loss).
5. ``max_windows`` keeps the first windows only (a quick estimate; results record how many).

The number depends on ``seq_len`` (longer windows give every token more context), so every
result states its ``seq_len`` and ``windows``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecospa_deploy.errors import EcospaError


@dataclass
class Perplexity:
    perplexity: float
    nll: float                 # mean negative log-likelihood per predicted token (nats)
    windows: int
    seq_len: int
    tokens: int                # predicted tokens
    text_tokens: int           # tokens in the whole text
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[floor(N/seq_len), seq_len]`` non-overlapping windows; remainder dropped."""
    if seq_len < 2:
        raise EcospaError(f"seq_len={seq_len} is invalid; expected >= 2")
    n = ids.numel() // seq_len
    if n == 0:
        raise EcospaError(f"the text has {ids.numel()} tokens, shorter than one window of "
                          f"seq_len={seq_len}; give more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 1,
               progress: bool = True, max_windows: int | None = None, bf16: bool = False,
               desc: str = "perplexity") -> Perplexity:
    """Perplexity of ``model`` on the token ids ``ids`` (1-D) under the module's protocol;
    ``bf16`` runs the forward under CUDA bf16 autocast (the loss stays fp32)."""
    from tqdm.auto import tqdm

    from ecospa_deploy.families import max_positions

    max_pos = max_positions(model)
    if max_pos and seq_len > max_pos:
        raise EcospaError(f"seq_len={seq_len} exceeds the model's {max_pos} positions; expected "
                          f"--seq-len <= {max_pos}")
    wins = windows_of(ids, seq_len)
    if max_windows:
        wins = wins[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    start = time.perf_counter()
    try:
        for s in tqdm(range(0, wins.shape[0], batch_size), desc=desc,
                      disable=not progress, leave=False):
            batch = wins[s:s + batch_size].to(device)
            ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and batch.is_cuda
                   else torch.autocast("cpu", enabled=False))
            with ctx:
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  reduction="sum")
            total_nll += float(nll)
            count += target.numel()
    finally:
        model.train(was_training)
    mean = total_nll / count
    return Perplexity(perplexity=math.exp(mean), nll=mean, windows=int(wins.shape[0]),
                      seq_len=seq_len, tokens=count, text_tokens=int(ids.numel()),
                      seconds=time.perf_counter() - start)


def text_perplexity(model: nn.Module, tokenizer, text: str, seq_len: int, batch_size: int = 1,
                    progress: bool = True) -> Perplexity:
    from ecospa_deploy.prune.calibration import tokenize

    return perplexity(model, tokenize(tokenizer, text), seq_len, batch_size, progress)


__all__ = ["Perplexity", "windows_of", "perplexity", "text_perplexity"]
