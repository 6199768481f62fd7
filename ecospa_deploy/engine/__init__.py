"""Fast generation: static per-layer KV cache, exact padding, fused projections, CUDA graphs."""

from .engine import Engine, batch_bucket, kv_bucket
from .sampling import SamplingParams, sample_tokens

__all__ = ["Engine", "SamplingParams", "sample_tokens", "kv_bucket", "batch_bucket"]
