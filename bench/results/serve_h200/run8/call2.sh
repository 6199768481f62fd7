#!/usr/bin/env bash
# Run 8, call 2 (lent GPU; carry .whl24), right after call 1 on the same warm card (Inductor's
# cache in /tmp warm): both twins with --prefill-chunk 8192 (the burst's 33 280 prompt tokens
# in ~5 scheduler steps instead of ~17; vLLM's online-serving token budget), then the dense
# twin's burst with --engine-process (call 1 has the pruned one).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--prefill-chunk 8192" --tag _chunk8192 --out $OUT >$OUT/serve_chunk8192.log 2>&1
echo "chunk 8192 rc $?"
timeout ${T2:-140} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which dense \
  --server-args="--engine-process" --tag _core --out $OUT >$OUT/serve_dense_core.log 2>&1
echo "serve core rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
