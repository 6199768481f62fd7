"""Fast generation: static per-layer KV cache, exact padding, fused projections, CUDA graphs."""
