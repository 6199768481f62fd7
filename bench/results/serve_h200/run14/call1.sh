#!/usr/bin/env bash
# Run 14, call 1 (lent GPU; carry .whl24, and .cc24 when a former lease left it): one twin's
# default server (packed, compiled prefill, 8 192 tokens a step, shortest first) over HTTP,
# the burst twice, its server log beside the results; then the same server
# started again on the now warm compile cache, the burst only (run 13: is a lease's first,
# cold-compiled server slower than a later one with the same flags?); then the caches packed
# into $OUT for the next lease. `bash .../call1.sh pruned` first (its cold start is the long
# one), then `dense`.
set -u
which=${1:?dense or pruned}
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-450} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which $which \
  --tag _${which}_first --out $OUT >$OUT/serve_${which}_first.log 2>&1
echo "$which first rc $?"
timeout ${T2:-90} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which $which \
  --tag _${which}_again --out $OUT >$OUT/serve_${which}_again.log 2>&1
echo "$which again rc $?"
grep -h "server up" $OUT/serve_${which}_*.log
grep -hE "objects frozen|gc while serving" $OUT/server_*.log | cut -c1-300
grep -hE "^$which " $OUT/serve_${which}_*.log | cut -c1-420
results_bundle
cache_save
