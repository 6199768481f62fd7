#!/usr/bin/env bash
# Run 8, call 2 (lent GPU; carry .whl24), right after call 1 on the same warm card (Inductor's
# cache in /tmp warm): the pruned twin's burst with --engine-process (one process is call 1),
# then both twins with --prefill-chunk 8192 (the burst's 33 280 prompt tokens in ~5 scheduler
# steps instead of ~19; vLLM's token budget for its API server on GPUs of >= 70 GiB).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-150} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --server-args="--engine-process" --tag _core --out $OUT >$OUT/serve_pruned_core.log 2>&1
echo "serve core rc $?"
timeout ${T2:-300} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--prefill-chunk 8192" --tag _chunk8192 --out $OUT >$OUT/serve_chunk8192.log 2>&1
echo "chunk 8192 rc $?"
tail -n 2 $OUT/*.log | cut -c1-400
