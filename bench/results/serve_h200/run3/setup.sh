# Sourced by this folder's scripts on the lent GPU: the carried .whl24 wheels (fastapi, starlette,
# uvicorn, pydantic, prometheus-client, httpx for cp312) and a copy of the package with bench/
# and converters/ inside it, on PYTHONPATH; $repo is the checkout, the scripts then run in /tmp
# (the checkout's ecospa_deploy/ would shadow the copy).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site24 .whl24/*.whl \
  || exit 1
mkdir -p /tmp/pkg && cp -r ecospa_deploy /tmp/pkg/ && cp -r bench /tmp/pkg/ecospa_deploy/bench \
  && cp -r converters /tmp/pkg/ecospa_deploy/converters
export PYTHONPATH=/tmp/pkg:/tmp/site24 PATH=/tmp/site24/bin:$PATH PYTHONUNBUFFERED=1
repo=$PWD
cd /tmp
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
