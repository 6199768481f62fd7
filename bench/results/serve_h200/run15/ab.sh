#!/usr/bin/env bash
# Run 15, the tree A/B (lent GPU; carry .whl24, .cc24, .before and .run10): one twin's default
# server and burst (`serve_gpu`, the second burst counts) under three trees on one lease, in
# the order run10 before after after before (five warm starts, ~85 s each, fit one call):
#   run10  = commit ffc5c92, run 10's tree (`git archive ffc5c92 ecospa_deploy bench converters
#            ':(exclude)bench/results' | tar x -C .run10`), its prefill compiled by flag as since;
#   before = commit f8067d3 (.before: `git archive f8067d3 ...` as above), every change since
#            run 10 but the last: the scheduler's prompt order, the per-token host work, the
#            start-up heap frozen;
#   after  = this checkout: the engine's host-to-device copies staged (engine/staging.py), so
#            collecting a step no longer waits for the step launched ahead.
# run10 against before: run 14 served both twins slower than run 10 (pruned 0.85x, dense
# 0.91x) with the same kernels and the same plan: the lease, or the tree? before against
# after: the staging alone. SIGINT at the time limit: run 10's tree predates
# stop_on_sigterm, and its `with` stops its server on KeyboardInterrupt.
set -u
which=${1:-pruned}
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
nvidia-smi --query-gpu=name --format=csv,noheader
for tree in run10 before; do
  mkdir -p /tmp/pkg_$tree && cp -r $repo/.$tree/ecospa_deploy /tmp/pkg_$tree/ \
    && cp -r $repo/.$tree/bench /tmp/pkg_$tree/ecospa_deploy/bench \
    && cp -r $repo/.$tree/converters /tmp/pkg_$tree/ecospa_deploy/converters
done
host_probe _start
for tree in run10 before after after before; do
  n=$(ls $OUT/serve_${which}_${tree}_r*.log 2>/dev/null | wc -l); tag=_${which}_${tree}_r$((n + 1))
  pkg=/tmp/pkg_$tree; extra=(); [ $tree = after ] && pkg=/tmp/pkg
  [ $tree = run10 ] && extra=(--server-args=--compile-prefill)
  PYTHONPATH=$pkg:/tmp/site24 timeout -s INT -k 15 ${T1:-120} python3 -m ecospa_deploy.bench.serve_gpu \
    --shape llama-1b --which $which --tag $tag --out $OUT "${extra[@]}" >$OUT/serve$tag.log 2>&1
  echo "$tag rc $?"
done
grep -h "server up" $OUT/serve_${which}_*_r*.log
grep -hE "^$which " $OUT/serve_${which}_*_r*.log | cut -c1-300
host_probe _end
results_bundle
