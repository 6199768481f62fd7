#!/usr/bin/env bash
# Run 10, call 3 (lent GPU; carry .whl24), same card (Inductor's cache warm): the HTTP burst,
# both twins, with --compile-prefill, to set against call 2's default server.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --server-args="--compile-prefill" --tag _compile_prefill --out $OUT \
  >$OUT/serve_compile_prefill.log 2>&1; echo "serve compile-prefill rc $?"
grep -hE '^(dense|pruned) ' $OUT/serve_*.log | cut -c1-500
