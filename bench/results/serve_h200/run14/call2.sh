#!/usr/bin/env bash
# Run 14, call 2 (lent GPU; carry .whl24 and .cc24), once call 1 has run for both twins (or a
# former lease's caches came back in .cc24): both twins in one run on warm caches, the burst
# and the loads (pruned / dense within one run); then the server's compiled decode step at
# the Poisson loads' batches (the TPOT target's denominator).
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --loads --rates 16,32 --tag _both --out $OUT >$OUT/serve_both.log 2>&1
echo "both rc $?"
grep -h "server up" $OUT/serve_both.log
grep -hE "^(dense|pruned) |pruned_over" $OUT/serve_both.log | cut -c1-420
timeout ${T3:-200} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 8 16 32 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_decode.json >$OUT/profile_decode.log 2>&1; echo "profile rc $?"
tail -n 20 $OUT/profile_decode.log | cut -c1-200
results_bundle
