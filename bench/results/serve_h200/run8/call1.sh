#!/usr/bin/env bash
# Run 8, call 1 (lent GPU; carry .whl24): everything the TPOT and TTFT targets need from one
# card in one call. (1) the server's compiled decode step at the burst's batches and contexts
# (the TPOT target's denominator); (2) both twins over HTTP, one-process server, compiled, with
# the TTFT split (client vs the scheduler's own arrival-to-first-token); (3) the pruned twin's
# burst with --engine-process (Inductor's cache warm from (2)).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-110} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 16 32 64 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_server_compiled.json >$OUT/profile_server_compiled.log 2>&1
echo "profile rc $?"
timeout ${T2:-320} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"
timeout ${T3:-140} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--engine-process" --tag _core --out $OUT >$OUT/serve_pruned_core.log 2>&1
echo "serve core rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
