#!/usr/bin/env bash
# Run 7, call 4 (lent GPU; carry .whl24), right after call 1 on the same warm card (Inductor's
# cache in /tmp warm): the server's compiled decode step at the burst's batches and contexts
# (the TPOT target compares the server's TPOT p50 with it), then the HTTP burst at
# --prefill-chunk 8192 (the burst's 33 280 prompt tokens in ~5 steps instead of ~17).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-120} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 16 32 64 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_server_compiled.json >$OUT/profile_server_compiled.log 2>&1
echo "profile rc $?"
timeout ${T2:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--prefill-chunk 8192" --tag _chunk8192 --out $OUT >$OUT/serve_chunk8192.log 2>&1
echo "chunk 8192 rc $?"
tail -n 1 $OUT/*.log | cut -c1-300
