#!/usr/bin/env bash
# Run 6, second call: the two rows whose processes ran out of GPU memory with 14 rows side by
# side (ecospa seed 2 at -50 %, ecospa-act seed 0 at -40 %), after the serving call that left
# the first GGUF chunk in /tmp/g; the first call's self-generated text comes in as .selftext/.
PREP="0 2" RQ_ARGS="--gen-batch 512" bash bench/results/real_quality/h200_run3/run.sh 450 \
  "2:ecospa:0.5" "0:ecospa-act:0.4"
