#!/usr/bin/env bash
# Run 13, call 3 (lent GPU; carry .whl24): the pruned twin alone on the default server, twice
# on the same card with the same flags: first with Inductor's cache cold (the burst and the
# loads), then warm (the burst). Each server's log is streamed to $OUT with the warm-up's
# progress (call 2's pruned run printed nothing in 280 s). Runs 10 and 13 saw the lease's
# first, cold-compiled server run slower than a later one; the second start tells whether it
# is the cold compile or the flags.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-400} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --loads --rates 16,32 --tag _pruned_cold --out $OUT >$OUT/serve_pruned_cold.log 2>&1
echo "pruned cold rc $?"
timeout ${T2:-130} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --tag _pruned_warm --out $OUT >$OUT/serve_pruned_warm.log 2>&1
echo "pruned warm rc $?"
grep -hE "warm-up: 1/|graphs, [0-9.]+ s \(packed prefill [0-9]+ tokens\)$|server up" \
  $OUT/*.log | cut -c1-160 | tail -n 8
grep -hE "^pruned " $OUT/serve_pruned_*.log | cut -c1-420
