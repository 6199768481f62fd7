"""Triton decode kernels: a fused linear (norm prologue, RoPE/KV-cache/activation/residual
epilogues) and split-KV decode attention with separate q/k and v head dims."""

from .runtime import available, interpreting

__all__ = ["available", "interpreting"]
