#!/usr/bin/env bash
# Run 6, call 3 (same card): the server's decode step compiled and not at the burst's batches
# and contexts (the TPOT target compares the server's TPOT with this step), then the step's
# prompt-token budget against TTFT: the HTTP burst at --prefill-chunk 8192 (the burst's 33 280
# prompt tokens in 5 steps instead of 17, each pausing every stream).
set -u
source bench/results/serve_h200/run3/setup.sh
for c in "" default; do
  timeout ${T1:-120} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
    --batch 16 32 64 --context 128 640 1152 --decode server --compile "$c" \
    --json $OUT/profile_server${c:+_compiled}.json >$OUT/profile_server${c:+_compiled}.log 2>&1
  echo "profile '$c' rc $?"
done
timeout ${T:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--prefill-chunk 8192" --tag _chunk8192 --out $OUT >$OUT/serve_chunk8192.log 2>&1
echo "chunk 8192 rc $?"
tail -n 1 $OUT/*.log | cut -c1-300
