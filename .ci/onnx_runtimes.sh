#!/usr/bin/env bash
# CI stage: `ecospa convert onnx` exports on the ONNX runtimes users deploy with, each in its own
# venv: onnxruntime-genai, and optimum (optimum-onnx 0.1.0 pins transformers < 4.58, our package
# needs transformers 5, so neither can share the main venv). The main venv builds the exports
# (targets genai and optimum of a pruned, heterogeneous tiny Llama) and our transformers
# modeling's greedy tokens; each runtime venv runs tests/test_onnx_runtimes.py against them.
# ~1 min to install both venvs (skipped when they already import), ~1 min of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
MAIN="${MAIN_PYTHON:-.venv/bin/python}"
GENAI_VENV="${GENAI_VENV:-.venv-genai}"
OPTIMUM_VENV="${OPTIMUM_VENV:-.venv-optimum}"
PYTEST=(-m pytest -q --noconftest -p no:cacheprovider -m onnx_runtimes tests/test_onnx_runtimes.py)

FIXTURE="$(mktemp -d)"
trap 'rm -rf "$FIXTURE"' EXIT
timeout 300 "$MAIN" tests/onnx_runtime_fixture.py "$FIXTURE"
export ECOSPA_ONNX_FIXTURE="$FIXTURE"

if ! "$GENAI_VENV/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
    "$PYTHON" -m venv "$GENAI_VENV"
    timeout 600 "$GENAI_VENV/bin/pip" install -q "onnxruntime-genai==0.18.0" numpy "pytest>=8"
fi
"$GENAI_VENV/bin/python" -c "import onnxruntime_genai as og; print('onnxruntime-genai', og.__version__)"
timeout 300 "$GENAI_VENV/bin/python" "${PYTEST[@]}" -k genai

if ! "$OPTIMUM_VENV/bin/python" -c "import optimum.onnxruntime" 2>/dev/null; then
    "$PYTHON" -m venv "$OPTIMUM_VENV"
    # torch==2.13.0: the main venv's torch (optimum imports it; any CPU build works).
    timeout 900 "$OPTIMUM_VENV/bin/pip" install -q "optimum-onnx[onnxruntime]==0.1.0" \
        "torch==2.13.0" "pytest>=8"
fi
"$OPTIMUM_VENV/bin/python" -c "import optimum.onnxruntime, transformers, onnxruntime; \
print('optimum-onnx', __import__('importlib.metadata').metadata.version('optimum-onnx'), \
'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
timeout 300 "$OPTIMUM_VENV/bin/python" "${PYTEST[@]}" -k "optimum and not onnxruntime_genai"
