#!/usr/bin/env bash
# Run 8, call 3 (lent GPU; carry .whl24, which has openai for transformers serve's extra): the
# peer, transformers serve --continuous-batching --cb-use-cuda-graph, on the dense llama-1b
# (stock class, random weights), the same burst and loads as serve_gpu (bench/serve_peer.py).
set -u
source bench/results/serve_h200/run3/setup.sh
python3 -c "import transformers; print('transformers', transformers.__version__)"
timeout ${T1:-400} python3 -m ecospa_deploy.bench.serve_peer --shape llama-1b --loads --rates 16,32 \
  --server-args="--cb-use-cuda-graph" --tag _cudagraph --out $OUT >$OUT/serve_peer.log 2>&1
echo "peer rc $?"
tail -n 8 $OUT/serve_peer.log | cut -c1-400
