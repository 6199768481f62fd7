#!/usr/bin/env bash
# Run 6, call 2 (same card, right after call 1): the step's prompt-token budget against TTFT.
# The HTTP burst and loads, both twins, at --prefill-chunk 2048 (the default) and 8192 (a
# burst's 33 280 prompt tokens in 5 steps instead of 17, each pausing every stream).
set -u
source bench/results/serve_h200/run3/setup.sh
for chunk in 2048 8192; do
  timeout ${T:-270} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads \
    --rates 16,32 --server-args "--prefill-chunk $chunk" --tag _chunk$chunk \
    --out $OUT >$OUT/serve_chunk$chunk.log 2>&1; echo "chunk $chunk rc $?"
done
tail -n 1 $OUT/*.log | cut -c1-300
