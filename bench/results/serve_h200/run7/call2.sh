#!/usr/bin/env bash
# Run 7, call 2 (lent GPU; carry .whl24), the short form of call 1 for a session with little
# GPU time left: the pruned twin only (the twin the GIL cost most in run 5), the 64-stream
# burst twice, one-process server vs --engine-process on one card.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-200} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --out $OUT >$OUT/serve_pruned.log 2>&1; echo "serve rc $?"
timeout ${T2:-140} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--engine-process" --tag _core --out $OUT >$OUT/serve_pruned_core.log 2>&1
echo "serve core rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
