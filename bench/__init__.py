"""Benchmark harness (installed as ``ecospa_deploy.bench``): dense vs pruned, every figure next to its floor."""
