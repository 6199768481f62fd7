#!/usr/bin/env bash
# Run 5 (lent GPU): faithful `numerical` (the paper's units: heads and MLP channels, Eq. 11
# compensation) over seeds 0-2, and ecospa-act seed 0 with its q/k floor at the default
# 300 x 16 recovery; run 3's script (../h200_run3/run.sh), after a call that left the first
# GGUF chunk in /tmp/g:
PREP="0 1 2" RQ_ARGS="--gen-batch 512" bash bench/results/real_quality/h200_run3/run.sh 540 \
  "0:numerical:0.1 0.2" "1:numerical:0.1 0.2" "2:numerical:0.1 0.2" \
  "0:numerical:0.3 0.4 0.5" "1:numerical:0.3 0.4 0.5" "2:numerical:0.3 0.4 0.5" \
  "0:ecospa-act:0.1 0.3 0.5" "0:ecospa-act:0.2 0.4"
