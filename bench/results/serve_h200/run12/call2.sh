#!/usr/bin/env bash
# Run 12, call 2 (lent GPU; carry .whl24), on call 1's card: call 1's (2) and (3) for the pruned
# twin; then, while the call's time lasts, the server's compiled decode step at the batches the
# Poisson loads run (the TPOT target's denominator).
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-280} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --loads --rates 16,32 --tag _pruned_default --out $OUT >$OUT/serve_pruned_default.log 2>&1
echo "pruned default rc $?"
timeout ${T2:-120} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--prefill-order arrival" --tag _pruned_arrival --out $OUT \
  >$OUT/serve_pruned_arrival.log 2>&1; echo "pruned arrival rc $?"
grep -hE '^pruned ' $OUT/serve_pruned_*.log | cut -c1-420
timeout ${T3:-150} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 8 16 32 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_decode.json >$OUT/profile_decode.log 2>&1; echo "profile rc $?"
tail -n 30 $OUT/profile_decode.log | cut -c1-300
