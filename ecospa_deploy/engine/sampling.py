"""Sampling parameters shared by the engine, the HF reference backend and the server.

``sample_tokens`` picks the next token of every row on the device with no host sync (it runs
inside the captured decode graph). Randomness is counter-based: the Gumbel noise of token ``v``
for a request is a hash of ``(seed, position, v)``, so a seeded request gives the same tokens
whatever else shares its batch and whichever slot it runs in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` means greedy.

    ``stop_token_ids``: generation ends after emitting one of them (it is included in the
    output, as HF ``generate`` does with EOS). ``seed=None`` draws a fresh seed per request.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}; expected an int >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}; expected a finite float >= 0 "
                             "(0 = greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 <= self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}; expected a float in [0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0 = off)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}; expected an int or None")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic on every device).
_GOLDEN = -7046029254386353131          # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687            # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685            # 0x94D049BB133111EB


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (arithmetic shift, then clear the sign-extended bits)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: torch.Tensor
                  ) -> torch.Tensor:
    """Uniform (0, 1) floats ``[B, V]`` from a hash of (seed, position, token id)."""
    x = _mix(seeds[:, None] * _GOLDEN + positions[:, None])
    x = _mix(x + vocab * _GOLDEN)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
                  ) -> torch.Tensor:
    """Next token per row: greedy where ``temperature == 0``, else top-k/top-p + Gumbel-max.

    ``logits [B, V]`` float32; per-row ``temperature``/``top_p`` float, ``top_k``/``seeds``/
    ``positions`` int64 (``top_k == 0`` keeps every token). The highest-probability token is
    always kept, so ``top_p`` near 0 degrades to greedy rather than to nothing.
    """
    vocab = logits.shape[-1]
    greedy = logits.argmax(-1)
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs                        # mass ranked above each token
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    keep = (rank[None] < k[:, None]) & (before < top_p[:, None])
    u = uniform_noise(seeds, positions, order)
    gumbel = -torch.log(-torch.log(u))
    score = torch.where(keep, sorted_logits + gumbel, float("-inf"))
    picked = order.gather(1, score.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, picked, greedy)
