#!/usr/bin/env bash
# Run 7, call 3 (lent GPU; carry .whl24), the shortest form for a session with ~5 minutes of
# GPU left: call 2's A/B (pruned twin, burst twice, one process vs --engine-process) with
# --no-compile on both sides, whose starts take ~40 s instead of ~170 s.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-120} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--no-compile" --tag _nocompile --out $OUT >$OUT/serve_pruned.log 2>&1
echo "serve rc $?"
timeout ${T2:-120} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--no-compile --engine-process" --tag _nocompile_core --out $OUT \
  >$OUT/serve_pruned_core.log 2>&1; echo "serve core rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
