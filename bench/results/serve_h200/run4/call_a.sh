#!/usr/bin/env bash
# Run 4's device call, which also leaves the first GGUF chunk in /tmp/g for the real-model call
# after it (../../real_quality/h200_run6/run_b.sh).
mkdir -p /tmp/g && cp .gg/part.aa /tmp/g/
bash bench/results/serve_h200/run4/run.sh
