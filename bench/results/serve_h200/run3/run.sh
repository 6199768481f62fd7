#!/usr/bin/env bash
# Run 3, call 2 (lent GPU): batched prefill (add_many on graphs warmed for 1/2/4/8 rows, whole
# prompts wait for the next step instead of being cut). The engine's GPU tests first, then the
# burst without HTTP (serve_replay, chunk 2048 and 4096), then the HTTP burst and the
# `ecospa bench serve` loads (serve_gpu --loads). Needs .whl24 (fastapi, starlette, uvicorn,
# pydantic, prometheus-client, httpx wheels for cp312) carried.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site24 .whl24/*.whl \
  || exit 1
mkdir -p /tmp/pkg && cp -r ecospa_deploy /tmp/pkg/ && cp -r bench /tmp/pkg/ecospa_deploy/bench \
  && cp -r converters /tmp/pkg/ecospa_deploy/converters
repo=$PWD
export PYTHONPATH=/tmp/pkg:/tmp/site24 PATH=/tmp/site24/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
(cd /tmp && timeout ${T0:-120} python3 -m pytest -q -x -p no:cacheprovider --rootdir /tmp \
  $repo/tests/test_engine_gpu.py >$OUT/gpu_tests.log 2>&1; echo "tests rc $?")
cd /tmp
timeout ${T1:-200} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --out $OUT \
  >$OUT/replay.log 2>&1; echo "replay rc $?"
[ "${T2:-0}" = 0 ] || { timeout $T2 python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b \
  --prefill-chunk 4096 --tag _chunk4096 --out $OUT >$OUT/replay4096.log 2>&1; echo "rc $?"; }
timeout ${T3:-250} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads \
  --rates 8,16,32 --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"
tail -n 3 $OUT/*.log
