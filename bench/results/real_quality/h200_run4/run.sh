#!/usr/bin/env bash
# Run 4 (H200): the anchors' missing seeds, with run 3's script (../h200_run3/run.sh), default
# 300 x 16 recovery, after a call that left the first GGUF chunk in /tmp/g:
PREP="0 1 2" RQ_ARGS="--gen-batch 512" bash bench/results/real_quality/h200_run3/run.sh 555 \
  "0:llm-pruner:0.2 0.3" "2:llm-pruner:0.2 0.3" "0:llm-pruner:0.4 0.5" "1:llm-pruner:0.4 0.5 0.1" \
  "2:llm-pruner:0.4 0.5" "2:wanda-sp:0.1 0.2 0.3" "1:wanda-sp:0.3 0.4 0.5" "2:wanda-sp:0.4"
