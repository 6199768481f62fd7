#!/usr/bin/env bash
# Run 3, call 1 (H200/H100): where the burst's time goes without HTTP. The decode step of the
# server's path (fused at batch 1, PyTorch linears + Triton attention above) at the burst's
# batches and contexts, with its top kernels; then the burst replayed through the scheduler and
# the engine alone (bench/serve_replay.py), on the tree with batched
# prefill (Engine.add_many). Needs .whl24 (prometheus-client, httpx) carried.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout 60 python3 -m pytest -q -x -p no:cacheprovider --rootdir /tmp $repo/tests/test_engine_gpu.py -k warmed \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"
timeout ${T1:-150} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b --batch 32 64 \
  --context 128 1152 --decode server --kernels --json $OUT/profile_decode_server.json \
  >$OUT/profile_decode.log 2>&1; echo "rc $?"
timeout ${T2:-240} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --out $OUT \
  >$OUT/replay.log 2>&1; echo "rc $?"
tail -n 3 $OUT/*.log
