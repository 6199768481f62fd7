#!/usr/bin/env bash
# Run 8, call 1 (lent GPU; carry .whl24): what the TPOT and TTFT targets need from one card in
# one call. (1) Both twins over HTTP, one-process server, compiled, the burst twice and the
# loads, with the TTFT split (the client's mean vs the scheduler's own arrival-to-first-token;
# the client is aiohttp from this run on). (2) The server's compiled decode step at the burst's
# batches and contexts (the TPOT target's denominator), Inductor's cache warm from (1); its
# rows are in the log as they come, should the limit cut it.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-370} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"
timeout ${T2:-170} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b \
  --batch 16 32 64 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_server_compiled.json >$OUT/profile_server_compiled.log 2>&1
echo "profile rc $?"
tail -n 2 $OUT/*.log | cut -c1-400
