#!/usr/bin/env bash
# Run 14, call 3 (lent GPU; carry .whl24, .cc24 and .before), after calls 1-2 on the same
# machine (warm caches): the per-token host work A/B on the GPU. `.before` is the tree of
# commit 390a868 (`git archive 390a868 ecospa_deploy bench converters ':(exclude)bench/results' | tar x -C .before`),
# before the token counter once a step, the chunks written as text and the direct
# detokenizer; this checkout is after. The dense twin's burst, alternating before/after twice.
set -u
which=${1:-dense}
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
mkdir -p /tmp/pkg_before && cp -r $repo/.before/ecospa_deploy /tmp/pkg_before/ \
  && cp -r $repo/.before/bench /tmp/pkg_before/ecospa_deploy/bench \
  && cp -r $repo/.before/converters /tmp/pkg_before/ecospa_deploy/converters
for round in 1 2; do
  for tree in before after; do
    pkg=/tmp/pkg; [ $tree = before ] && pkg=/tmp/pkg_before
    PYTHONPATH=$pkg:/tmp/site24 timeout ${T1:-120} python3 -m ecospa_deploy.bench.serve_gpu \
      --shape llama-1b --which $which --tag _${which}_${tree}_r$round --out $OUT \
      >$OUT/serve_${which}_${tree}_r$round.log 2>&1
    echo "$tree r$round rc $?"
  done
done
grep -hE "^$which " $OUT/serve_${which}_*_r*.log | cut -c1-300
results_bundle
