#!/usr/bin/env bash
# Run 10, call 2 (lent GPU; carry .whl24), on the card of call 1 (Inductor's cache warm): the
# HTTP burst, both twins, the default server (packed, 8192 a step, decode compiled) against
# --compile-prefill, back to back.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-250} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --out $OUT >$OUT/serve_default.log 2>&1; echo "serve default rc $?"
timeout ${T2:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --server-args="--compile-prefill" --tag _compile_prefill --out $OUT \
  >$OUT/serve_compile_prefill.log 2>&1; echo "serve compile-prefill rc $?"
grep -hE '^(dense|pruned) ' $OUT/serve_*.log | cut -c1-500
