#!/usr/bin/env bash
# Run 9, call 4 (as run; lent GPU, carry .whl24), same card: --prefill-chunk 8192, packed,
# without HTTP (no compile) and over HTTP (compiled, burst only, Inductor's cache warm).
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout 150 python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
  --prefill-chunk 8192 --tag _packed_nocompile_chunk8192 --out $OUT >$OUT/replay_chunk8192.log 2>&1
echo "replay rc $?"
timeout 290 python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --server-args="--prefill-chunk 8192" --tag _chunk8192 --out $OUT >$OUT/serve_chunk8192.log 2>&1
echo "serve rc $?"
