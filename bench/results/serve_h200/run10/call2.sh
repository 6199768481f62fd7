#!/usr/bin/env bash
# Run 10, call 2 (lent GPU; carry .whl24), on the card of call 1: the default server since run 9
# (packed prefill, 8192 tokens a step, decode compiled) over HTTP, both twins, the burst twice
# and the loads (1024-in/128-out at once, Poisson 16 and 32 req/s), with the TTFT split.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-420} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --out $OUT >$OUT/serve_default.log 2>&1; echo "serve default rc $?"
grep -hE '^(dense|pruned) ' $OUT/serve_*.log | cut -c1-500
