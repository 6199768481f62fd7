#!/usr/bin/env bash
# Run 11, call 1 (lent GPU; carry .whl24): the prompt order of the prefill over HTTP, the burst
# only: --prefill-order shortest (the default from this run: over every prompt not yet
# started, not only those admitted together) against arrival (first come first served); the
# dense twin first, then the pruned one while the call's time lasts. As first run (the lent
# time ran out) the first server's start, Inductor's cache cold, outlasted its 170 s limit:
# the first server of each twin now gets 300 s, the second (cache warm) 120 s.
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
for which in dense pruned; do
  t=300
  for order in shortest arrival; do
    timeout $t python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which $which \
      --server-args="--prefill-order $order" --tag _${which}_$order --out $OUT \
      >$OUT/serve_${which}_$order.log 2>&1; echo "$which $order rc $?"
    grep -hE "^$which " $OUT/serve_${which}_$order.log | cut -c1-420
    t=120
  done
done
