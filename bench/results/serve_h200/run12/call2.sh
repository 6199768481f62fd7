#!/usr/bin/env bash
# Run 12, call 2 (lent GPU; carry .whl24), on call 1's card: serve_twin.sh for the pruned twin;
# then, while the call's time lasts, the server's compiled decode step at the batches the
# Poisson loads run (the TPOT target's denominator).
set -u
T1=${T1:-280} bash bench/results/serve_h200/run12/serve_twin.sh pruned
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T3:-150} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 8 16 32 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_decode.json >$OUT/profile_decode.log 2>&1; echo "profile rc $?"
tail -n 30 $OUT/profile_decode.log | cut -c1-300
