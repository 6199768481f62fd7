#!/usr/bin/env bash
# Run 10, call 4 (lent GPU; carry .whl24), same card: call 2's loads with --compile-prefill.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-400} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--compile-prefill" --tag _compile_prefill_loads --out $OUT \
  >$OUT/serve_compile_prefill_loads.log 2>&1; echo "serve rc $?"
grep -hE '^(dense|pruned) ' $OUT/serve_*.log | cut -c1-300
