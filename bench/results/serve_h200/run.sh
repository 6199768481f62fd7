#!/usr/bin/env bash
# The server on the lent GPU (issue: ecospa-serve turns pruning into throughput): the burst and
# the bench-serve loads for the LLaMA-1B twins, with one and with four decode steps per host
# sync, and a py-spy timeline of the dense server. Needs .whl24 (fastapi, starlette, uvicorn,
# pydantic, py-spy wheels for cp312) carried; everything else is in the machine's image.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site24 .whl24/*.whl \
  || exit 1
mkdir -p /tmp/pkg && cp -r ecospa_deploy /tmp/pkg/ && cp -r bench /tmp/pkg/ecospa_deploy/bench \
  && cp -r converters /tmp/pkg/ecospa_deploy/converters
export PYTHONPATH=/tmp/pkg:/tmp/site24 PATH=/tmp/site24/bin:$PATH PYTHONUNBUFFERED=1
cd /tmp   # not the checkout: its ecospa_deploy/ would shadow the copy
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
sg="python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --out $OUT"
timeout ${T1:-230} $sg --loads --rates 8,16,32 >$OUT/serve.log 2>&1; echo "rc $?"
# T2=0 / T3=0 skip a stage
[ "${T2:-170}" = 0 ] || { timeout ${T2:-170} $sg --server-args "--decode-steps 4" --tag _ds4 \
  >$OUT/serve_ds4.log 2>&1; echo "rc $?"; }
[ "${T3:-120}" = 0 ] || { timeout ${T3:-120} python3 -m ecospa_deploy.bench.serve_profile \
  --shape llama-1b --out $OUT >$OUT/profile.log 2>&1; echo "rc $?"; }
tail -n 2 $OUT/*.log
