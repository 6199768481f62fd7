#!/usr/bin/env bash
# Run 6 (lent GPU): the rows the table still lacks for 3 seeds — ecospa (paper) seeds 1-2,
# numerical at -50 % seeds 0-2, ecospa-act seed 0 at -40/-50 % — one group per row, longest
# first, at most PAR at once (GPU memory / 9 GiB: 15 on an H200, 8 on an H100); run 3's script
# (../h200_run3/run.sh), after a call that left the first GGUF chunk in /tmp/g.
gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
PAR=$(( gib / 1024 / 9 )) PREP="0 1 2" RQ_ARGS="--gen-batch 512" \
  bash bench/results/real_quality/h200_run3/run.sh 540 \
  "1:ecospa:0.5" "2:ecospa:0.5" "1:ecospa:0.4" "2:ecospa:0.4" \
  "0:ecospa-act:0.5" "0:ecospa-act:0.4" "1:ecospa:0.3" "2:ecospa:0.3" \
  "0:numerical:0.5" "1:numerical:0.5" "2:numerical:0.5" \
  "1:ecospa:0.2" "2:ecospa:0.2" "2:ecospa:0.1"
