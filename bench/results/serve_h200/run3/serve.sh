#!/usr/bin/env bash
# Run 3, call 3 (lent GPU): the HTTP burst (serve_gpu, no --loads) on the tree with batched
# prefill. Needs .whl24 (fastapi, starlette, uvicorn, pydantic, prometheus-client, httpx) carried.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site24 .whl24/*.whl \
  || exit 1
mkdir -p /tmp/pkg && cp -r ecospa_deploy /tmp/pkg/ && cp -r bench /tmp/pkg/ecospa_deploy/bench \
  && cp -r converters /tmp/pkg/ecospa_deploy/converters
export PYTHONPATH=/tmp/pkg:/tmp/site24 PATH=/tmp/site24/bin:$PATH PYTHONUNBUFFERED=1
cd /tmp
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout ${T1:-280} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --out $OUT \
  >$OUT/serve.log 2>&1; echo "serve rc $?"
tail -n 4 $OUT/serve.log
